"""Reading adapter files safely: FIFOs and devices are refused before they are opened,
and every malformed file (deep JSON, huge numbers, bad encodings, truncation) is an
AdapterError, never another exception."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from gie_guard import AdapterError
from gie_guard.adapters import AdapterLibrary, Fingerprint, load_adapter, read_header, save_adapter
from gie_guard.adapters.format import METADATA_KEY

from test_adapter_format import make_adapter

FINGERPRINT = Fingerprint(tuple(f"down.{i}.attn2.processor" for i in range(4)), (32,) * 4)


def finishes(fn, timeout: float = 60.0):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get("error", box.get("value"))


@pytest.fixture
def good(tmp_path):
    return save_adapter(make_adapter(FINGERPRINT), tmp_path / "good.safetensors")


def test_fifo_named_safetensors_in_an_adapter_folder(tmp_path, good):
    os.mkfifo(tmp_path / "x.safetensors")
    done, result = finishes(lambda: AdapterLibrary([tmp_path], include_shipped=False).available())
    assert done, "the folder scan blocked on a FIFO"
    assert isinstance(result, AdapterError) and "FIFO" in str(result) and result.file.endswith("x.safetensors")


@pytest.mark.parametrize("reader", [read_header, load_adapter])
def test_fifo_and_directory_given_directly(tmp_path, reader):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    done, result = finishes(lambda: reader(fifo))
    assert done and isinstance(result, AdapterError) and "FIFO" in str(result)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(AdapterError, match="directory"):
        reader(folder)


def test_fifo_named_as_the_library_source(tmp_path):
    fifo = tmp_path / "one.safetensors"
    os.mkfifo(fifo)
    done, result = finishes(lambda: AdapterLibrary([fifo], include_shipped=False).available())
    assert done and isinstance(result, AdapterError) and "FIFO" in str(result)


def _with_metadata(path, entry: str):
    save_file({"x": torch.zeros(1)}, str(path), metadata={METADATA_KEY: entry})
    return path


def _meta(**changes):
    meta = {"format_version": 1, "name": "a", "fingerprint": FINGERPRINT.to_dict(), "categories": ["object"],
            "concepts": [], "scale_range": [0.0, 5.0], "training": {}}
    meta.update(changes)
    return json.dumps(meta)


DEEP = 100_000
MALFORMED_METADATA = {
    "nested-100k-lists": "[" * DEEP + "]" * DEEP,
    "nested-100k-objects": '{"a":' * DEEP + "1" + "}" * DEEP,
    "nested-in-a-key": _meta(training={"x": json.loads("[" * 50 + "]" * 50)})[:-1] + ', "deep": ' + "[" * DEEP + "]" * DEEP + "}",
    "huge-integer": _meta()[:-1] + ', "big": ' + "9" * 10_000 + "}",
    "infinite-layer-count": _meta(fingerprint={**FINGERPRINT.to_dict(), "layer_count": 1e999}),
    "infinite-dims": _meta(fingerprint={**FINGERPRINT.to_dict(), "cross_attention_dims": [1e999] * 4}),
    "format-version-inf": _meta(format_version=1e999),
    "format-version-true": _meta(format_version=True),
    "fingerprint-a-list": _meta(fingerprint=[1, 2]),
    "name-a-mapping": _meta(name={"a": 1}),
    "not-json": "{not json",
    "a-json-string": '"just text"',
    "lone-surrogate": '{"name": "\\ud800"',
}


@pytest.mark.parametrize("entry", list(MALFORMED_METADATA.values()), ids=list(MALFORMED_METADATA))
def test_malformed_metadata_is_an_adapter_error(tmp_path, entry):
    path = _with_metadata(tmp_path / "m.safetensors", entry)
    for reader in (read_header, load_adapter):
        with pytest.raises(AdapterError) as caught:
            reader(path)
        assert caught.value.file == str(path)


def _raw_file(path, header: bytes, body: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


MALFORMED_FILES = {
    "deep-header": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "header-not-utf8": b'{"__metadata__": {"' + METADATA_KEY.encode() + b'": "\xff\xfe"}}',
    "header-a-list": b"{" + b"}",  # an empty object: no metadata
    "metadata-not-an-object": b'{"__metadata__": [1, 2]}',
    "metadata-entry-a-number": b'{"__metadata__": {"' + METADATA_KEY.encode() + b'": 3}}',
    "huge-number-in-header": b'{"__metadata__": {}, "n": ' + b"9" * 10_000 + b"}",
}


@pytest.mark.parametrize("header", list(MALFORMED_FILES.values()), ids=list(MALFORMED_FILES))
def test_malformed_files_are_adapter_errors(tmp_path, header):
    path = _raw_file(tmp_path / "f.safetensors", header)
    for reader in (read_header, load_adapter):
        with pytest.raises(AdapterError):
            reader(path)


def test_truncated_and_oversized_headers(tmp_path, good):
    raw = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterError):
        load_adapter(cut)
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", 10**12) + b"{" + b" " * 20)
    with pytest.raises(AdapterError, match="bad header"):
        read_header(lying)


def test_good_adapter_still_loads_from_one_read(good):
    adapter = load_adapter(good)
    assert adapter.fingerprint == FINGERPRINT and adapter.scale_range == (1.0, 9.0)
    assert read_header(good).name == "beach"
