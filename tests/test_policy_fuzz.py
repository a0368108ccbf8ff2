"""Property-based tests over policy documents: whatever the input (random YAML trees, random
values for every key, random bytes and edits, random include graphs of real files), loading
either gives a snapshot or a PolicyError that names the file and a line or key path; never
another exception, never a hang, and errors never quote a value of the file."""

from __future__ import annotations

import hashlib
import tempfile
import threading
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gie_guard.errors import PolicyError
from gie_guard.policy import PolicySnapshot, load_policy

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
MARKER = "zqxmark"


class HashEmbedder:
    """Deterministic vectors, no model: fuzzing exercises deduplication too."""

    def encode(self, texts):
        rows = [np.frombuffer(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest()[:16], dtype=np.uint8)
                for t in texts]
        out = np.asarray(rows, dtype=np.float64) - 127.5
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def load_within(path: Path, timeout: float = 15.0):
    """load_policy in a thread: a hang fails the example instead of the whole run."""
    box: dict = {}

    def run():
        try:
            box["value"] = load_policy(path, embedder=HashEmbedder(), cache_dir=False)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "loading hung"
    return box.get("error", box.get("value"))


def check_outcome(result, folder: Path, *, marker: bool = False) -> None:
    if isinstance(result, PolicySnapshot):
        assert "outside" not in {c.id for c in result.concepts}, "a file outside the policy folder was included"
        return
    assert isinstance(result, PolicyError), f"{type(result).__name__}: {result}"
    assert result.file is not None and Path(result.file).resolve().is_relative_to(folder.resolve()), result
    assert result.line is not None or result.place is not None, result
    if marker:
        for problem in getattr(result, "problems", (result,)):
            if not (problem.place or "").startswith("include"):
                # include entries of a valid file are named in include errors; no other value is
                assert MARKER not in problem.problem, problem


# -- random values ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=-5, max_value=150),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1),
    st.text(max_size=12).map(lambda s: MARKER + s),
    st.sampled_from(["auto", "nsfw", "style", "record", "block", "fallback", "error", "a", "x.yaml", "nsfw"]),
)
keys = st.sampled_from(["name", "version", "description", "include", "inhibit_steps", "dedup_threshold",
                        "on_missing_adapter", "auto_scale", "concepts", "id", "text", "category", "aliases",
                        "scale", "enabled", "verify", "auto", "fallback", "min", "max", "verifier", "labels",
                        "action", "other", "x-y"])
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=20)

concept = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.sampled_from(["a", "b", "c-1", "d.e"]), trees),
    "text": st.one_of(st.sampled_from(["cat", "dog", "nude", "naked", "kitten"]), trees),
    "category": st.one_of(st.sampled_from(["nsfw", "style", "object", "custom"]), trees),
    "aliases": st.one_of(st.lists(st.sampled_from(["puppy", "car", "nudity", ""]), max_size=3), trees),
    "scale": st.one_of(st.floats(min_value=0, max_value=120), st.just("auto"),
                       st.fixed_dictionaries({"auto": st.just(True)}, optional={
                           "fallback": st.floats(0, 120), "min": st.floats(0, 120), "max": st.floats(0, 120)}),
                       trees),
    "enabled": st.one_of(st.booleans(), trees),
    "verify": st.one_of(st.fixed_dictionaries({"verifier": st.sampled_from(["shapes", "bad id!"])},
                                              optional={"action": st.sampled_from(["record", "blur", "x"])}), trees),
    "extra": trees,
})

policies = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["p", "my-policy", "bad name"]), trees),
    "version": trees,
    "description": trees,
    "include": st.one_of(st.lists(st.sampled_from(["shapes-demo", "missing.yaml", "no-such", "../up.yaml", "a/b"]),
                                  max_size=2), trees),
    "inhibit_steps": st.one_of(st.lists(st.floats(-0.5, 1.5), min_size=0, max_size=3), trees),
    "dedup_threshold": st.one_of(st.floats(-1, 3), trees),
    "on_missing_adapter": st.one_of(st.sampled_from(["fallback", "error"]), trees),
    "auto_scale": st.one_of(st.fixed_dictionaries({}, optional={"fallback": st.floats(0, 120),
                                                                "min": st.floats(0, 120), "max": st.floats(0, 120)}),
                            trees),
    "concepts": st.one_of(st.lists(concept, max_size=5), trees),
    "unknown": trees,
})


@SETTINGS
@given(doc=st.one_of(policies, trees))
def test_random_documents(doc):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        check_outcome(load_within(path), Path(folder), marker=True)


# -- random bytes and edits of a valid file ----------------------------------------------------

VALID = (b"version: '1'\nname: base\ninclude: [shapes-demo]\ninhibit_steps: [0.0, 0.8]\nauto_scale: "
         b"{fallback: 5.0, min: 0.0, max: 20.0}\nconcepts:\n  - id: nudity\n    text: nudity\n    aliases: [nude]\n"
         b"    scale: {auto: true, max: 4}\n  - {id: car, text: car, scale: 2, category: object}\n")


@st.composite
def edited(draw):
    raw = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
            [b"&a ", b"*a", b"!!python/name:os.system ", b"<<: ", b"\t", b"{", b"[", b"- ", b": ", b"\n  ", b"\xff",
             b"9" * 400, b"1e999", b"\x00", b"'", b'"\\']))
        if kind == "insert":
            raw[at:at] = chunk
        elif kind == "delete":
            del raw[at:at + len(chunk)]
        else:
            raw[at:at + len(chunk)] = chunk
    return bytes(raw)


@SETTINGS
@given(raw=st.one_of(edited(), st.binary(max_size=200)))
def test_random_bytes_and_edits(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.yaml"
        path.write_bytes(raw)
        check_outcome(load_within(path), Path(folder))


# -- random include graphs ---------------------------------------------------------------------


@st.composite
def include_graphs(draw):
    """Files f0..fn-1 (odd ones in sub/), each including others (by relative path), shipped
    names, missing files, paths outside the folder, folders; with conflicting concept ids."""
    n = draw(st.integers(1, 6))
    files = []
    for _ in range(n):
        includes = draw(st.lists(st.one_of(
            st.integers(0, n - 1),
            st.sampled_from(["shapes-demo", "nsfw", "missing.yaml", "../../outside.yaml", "sub/../f0.yaml",
                             "no-such", "./f0.yaml", "sub", "../outside.yaml"]),
        ), max_size=3))
        concepts = draw(st.lists(st.fixed_dictionaries({
            "id": st.sampled_from(["a", "b", "c", "circle", "nudity"]),
            "text": st.sampled_from(["cat", "dog", "circle", "nude"]),
        }, optional={"enabled": st.booleans(), "scale": st.sampled_from([1.0, 3.0, "auto"])}), max_size=3))
        broken = draw(st.sampled_from([None, None, None, "name: [x", "concepts: 3"]))
        files.append((includes, concepts, broken))
    return files


def _where(root: Path, i: int) -> Path:
    return (root if i % 2 == 0 else root / "sub") / f"f{i}.yaml"


@SETTINGS
@given(graph=include_graphs())
def test_random_include_graphs(graph):
    import os

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "policies"
        (root / "sub").mkdir(parents=True)
        (Path(folder) / "outside.yaml").write_text("name: outside\nconcepts: [{id: outside, text: z}]\n")
        for i, (includes, concepts, broken) in enumerate(graph):
            here = _where(root, i)
            entries = [os.path.relpath(_where(root, e), here.parent) if isinstance(e, int) else e for e in includes]
            doc = {"name": f"f{i}", "include": entries, "concepts": concepts}
            text = yaml.safe_dump(doc) if broken is None else broken + "\n"
            here.write_text(text, encoding="utf-8")
        check_outcome(load_within(root / "f0.yaml"), Path(folder))
