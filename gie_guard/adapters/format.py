"""The adapter file: safetensors tensors plus one JSON metadata entry. Never unpickled.

Tensors (float32)::

    net.0.weight (64, L)  net.0.bias (64,)   net.2.weight (32, 64)  net.2.bias (32,)
    net.4.weight (1, 32)  net.4.bias (1,)    feature_mean (L,)      feature_std (L,)

Metadata: the safetensors header's ``__metadata__`` holds ``{"gie_guard.adapter": JSON}``
with ``format_version``, ``name``, ``fingerprint`` (``layer_names`` in UNet order,
``layer_count``, ``cross_attention_dims``), ``categories``, ``concepts`` (texts it was
trained on), ``scale_range`` ``[lo, hi]`` and ``training`` (a summary; free-form).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError
from ..limits import MAX_ADAPTER_BYTES
from ..policy.files import FileProblem, open_regular
from .model import Fingerprint, MLPAdapter, ScaleMLP

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "AdapterHeader", "load_adapter", "read_header", "save_adapter"]

FORMAT_VERSION = 1
METADATA_KEY = "gie_guard.adapter"
SUFFIX = ".safetensors"
_MAX_HEADER = 16 * 1024 * 1024
# Anything a malformed file can make the metadata parsers raise (deep nesting, numbers
# too large to convert, wrong types): every one becomes an AdapterError.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError,
                 ArithmeticError, UnicodeError)


def _shapes(n: int) -> dict[str, tuple[int, ...]]:
    return {
        "net.0.weight": (64, n), "net.0.bias": (64,),
        "net.2.weight": (32, 64), "net.2.bias": (32,),
        "net.4.weight": (1, 32), "net.4.bias": (1,),
        "feature_mean": (n,), "feature_std": (n,),
    }


def save_adapter(adapter: MLPAdapter, path: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` to ``path`` (a ``.safetensors`` file); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise AdapterError(f"adapter files end in {SUFFIX}", file=str(path))
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in adapter.model.state_dict().items()}
    tensors["feature_mean"] = adapter.feature_mean.float().contiguous()
    tensors["feature_std"] = adapter.feature_std.float().contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "name": adapter.name,
        "fingerprint": adapter.fingerprint.to_dict(),
        "categories": list(adapter.categories),
        "concepts": list(adapter.concepts),
        "scale_range": list(adapter.scale_range),
        "training": adapter.training,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def _read(path: Path, *, whole: bool) -> bytes:
    """The file's bytes (or only its 8-byte length and JSON header, ``whole=False``), read
    through ``open_regular``: a FIFO, device or directory is refused before it is opened,
    and the file is opened once, so what is checked is what is parsed."""
    name = str(path)
    try:
        with open_regular(path, limit=MAX_ADAPTER_BYTES) as (f, size):
            head = f.read(9)
            _sniff(head, size, name)
            n = int.from_bytes(head[:8], "little")
            rest = f.read((size if whole else 8 + n) - len(head))
            raw = head + rest
    except FileProblem as exc:
        raise AdapterError(exc.problem if exc.kind != "too-big" else
                           f"{exc.problem} (MAX_ADAPTER_BYTES)", file=name) from None
    except OSError as exc:
        raise AdapterError(f"cannot read adapter file ({exc.strerror or exc})", file=name) from None
    if len(raw) < 8 + n:
        raise AdapterError("not a safetensors file (truncated header)", file=name)
    return raw


def _sniff(head: bytes, size: int, name: str) -> None:
    """Refuse anything that is not a safetensors file before any parser sees it."""
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise AdapterError(
            "this is a pickled PyTorch file (what torch.save writes: .pt/.pth/.bin); gie_guard never unpickles "
            "adapter files because unpickling runs arbitrary code. Adapters are safetensors files with "
            f"gie_guard metadata: train one with `gie-guard adapter train`, or re-save a trusted one with "
            "gie_guard.adapters.save_adapter",
            file=name,
        )
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or head[8:9] != b"{" or not 0 < n <= min(_MAX_HEADER, size - 8):
        raise AdapterError("not a safetensors file (bad header); adapters are .safetensors files", file=name)


def _metadata(raw: bytes, name: str) -> dict[str, Any]:
    """The adapter metadata object from a safetensors header (``raw``: length + header)."""
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except _PARSE_ERRORS as exc:
        raise AdapterError(f"not a safetensors file (unreadable JSON header: {type(exc).__name__})", file=name) from None
    if not isinstance(header, dict):
        raise AdapterError("not a safetensors file (the header is not a JSON object)", file=name)
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise AdapterError("not a safetensors file (__metadata__ is not a JSON object)", file=name)
    entry = (meta or {}).get(METADATA_KEY)
    if entry is None:
        raise AdapterError(f"safetensors file without gie_guard adapter metadata ({METADATA_KEY!r})", file=name)
    if not isinstance(entry, str):
        raise AdapterError("adapter metadata must be a JSON string in the safetensors metadata", file=name)
    try:
        parsed = json.loads(entry)
    except _PARSE_ERRORS as exc:
        # RecursionError for deeply nested JSON, ValueError for huge numbers or bad syntax
        what = "nested too deeply" if isinstance(exc, RecursionError) else type(exc).__name__
        raise AdapterError(f"adapter metadata is not valid JSON ({what})", file=name) from None
    if not isinstance(parsed, dict):
        raise AdapterError("adapter metadata is not a JSON object", file=name)
    return parsed


class AdapterHeader:
    """An adapter file's metadata, read without loading its tensors (for selection)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        name = meta.get("name")
        if name is not None and not isinstance(name, str):
            raise AdapterError("metadata 'name' must be a string", file=str(path))
        self.name = name or path.stem
        try:
            self.fingerprint = Fingerprint.from_dict(meta.get("fingerprint"), file=str(path))
        except AdapterError:
            raise
        except _PARSE_ERRORS as exc:
            raise AdapterError(f"malformed fingerprint in metadata ({type(exc).__name__})", file=str(path)) from None
        for key in ("categories", "concepts"):
            value = meta.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise AdapterError(f"metadata {key!r} must be a list of strings", file=str(path))
        self.categories = tuple(meta.get("categories", []))
        self.concepts = tuple(meta.get("concepts", []))

    def __repr__(self) -> str:
        return f"AdapterHeader(name={self.name!r}, path={str(self.path)!r}, categories={list(self.categories)})"


def read_header(path: str | os.PathLike[str]) -> AdapterHeader:
    """Read and check an adapter's metadata (format version, fingerprint), reading only the
    file's header."""
    path = Path(path)
    return _header(path, _read(path, whole=False))


def _header(path: Path, raw: bytes) -> AdapterHeader:
    meta = _metadata(raw, str(path))
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        shown = version if isinstance(version, int) and not isinstance(version, bool) and abs(version) < 10**6 else "?"
        raise AdapterError(
            f"adapter format version {shown} is not supported; this gie_guard reads version {FORMAT_VERSION}",
            file=str(path),
        )
    return AdapterHeader(path, meta)


def load_adapter(path: str | os.PathLike[str], *, pipeline: Any = None, fingerprint: Fingerprint | None = None) -> MLPAdapter:
    """Load an adapter file. With ``pipeline`` (or ``fingerprint``), a fingerprint mismatch is
    an :class:`~gie_guard.errors.AdapterError` naming what differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    path = Path(path)
    raw = _read(path, whole=True)  # one read: the tensors parsed are those of the header checked
    header = _header(path, raw)
    file = str(header.path)
    expected = fingerprint if fingerprint is not None else (Fingerprint.of_pipeline(pipeline) if pipeline is not None else None)
    if expected is not None:
        why = header.fingerprint.mismatch(expected)
        if why:
            raise AdapterError(f"adapter {header.name!r} was trained for another model: {why}", file=file)
    n = header.fingerprint.layer_count
    try:
        loaded = load_tensors(raw)
    except (SafetensorError, *_PARSE_ERRORS) as exc:
        raise AdapterError(f"not a readable safetensors file ({type(exc).__name__})", file=file) from None
    keys = set(loaded)
    want = _shapes(n)
    if keys != set(want):
        missing, extra = sorted(set(want) - keys), sorted(keys - set(want))
        raise AdapterError(f"unexpected tensors (missing {missing}, unexpected {extra})", file=file)
    tensors = {k: loaded[k] for k in want}
    for key, shape in want.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise AdapterError(
                f"tensor {key} has shape {tuple(t.shape)}, expected {shape} for {n} cross-attention layers", file=file
            )
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise AdapterError(f"tensor {key} must hold finite floating-point numbers", file=file)
    if not bool((tensors["feature_std"] > 0).all()):
        raise AdapterError("feature_std must be > 0", file=file)
    model = ScaleMLP(n)
    model.load_state_dict({k: v.float() for k, v in tensors.items() if k.startswith("net.")})
    model.eval()
    meta = header.meta
    try:
        lo, hi = (float(x) for x in meta["scale_range"])
    except _PARSE_ERRORS:
        raise AdapterError("metadata needs scale_range [lo, hi]", file=file) from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise AdapterError("scale_range must be finite", file=file)
    return MLPAdapter(
        name=header.name,
        fingerprint=header.fingerprint,
        categories=header.categories,
        scale_range=(lo, hi),
        model=model,
        feature_mean=tensors["feature_mean"].float(),
        feature_std=tensors["feature_std"].float(),
        concepts=header.concepts,
        training=_training(meta.get("training"), file),
        path=file,
    )


def _training(value: Any, file: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterError("metadata 'training' must be a JSON object", file=file)
    return dict(value)
