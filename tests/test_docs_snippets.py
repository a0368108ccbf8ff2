"""Every code snippet in README.md and docs/*.md runs as written (docs/contributing.md).

- A ```python block runs in a fresh namespace, with the working directory a new temporary
  folder. A block whose fence is preceded, on the line just before it, by
  ``<!-- continue -->`` continues the previous python block of the same file: the two run
  together, as one test named after the first.
- A ```yaml block that is a policy (a mapping with ``concepts``, which must also have its
  ``name``) is written to a file and loaded with ``gie_guard.policy.load_policy``. Other
  YAML (Serve configs, Kubernetes manifests) is only parsed.
- ``<!-- skip: reason -->`` on the line just before a fence skips that block (and what
  continues it); the reason shows in the test report.

Snippets run in this process (imports are already paid for), so they must be quick: tiny
or shapes-world pipelines, few steps. Servers and guards they leave open are closed after, and
guards built without ``metrics`` report to a fresh registry, never the global one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import yaml
from prometheus_client import CollectorRegistry

import gie_guard.metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
_MARK = re.compile(r"^\s*<!--\s*(?P<kind>continue|skip)(?::\s*(?P<reason>.*?))?\s*-->\s*$")


@dataclasses.dataclass
class Snippet:
    path: pathlib.Path
    line: int  # of the first fence
    lang: str
    code: str
    skip: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def extract(path: pathlib.Path) -> list[Snippet]:
    """The python and yaml blocks of one markdown file, continuations joined."""
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets: list[Snippet] = []
    last_python: Snippet | None = None
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, lang = fence.group("indent"), fence.group("lang").lower()
        end = i + 1
        while end < len(lines) and not re.match(rf"^{re.escape(indent)}```[ \t]*$", lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 1}: code fence never closed")
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end])
        mark = _MARK.match(lines[i - 1]) if i > 0 else None
        kind = mark.group("kind") if mark else None
        if kind == "skip" and not (mark and mark.group("reason")):
            raise ValueError(f"{path}:{i}: <!-- skip: ... --> needs a reason")
        if lang == "python":
            if kind == "continue":
                if last_python is None:
                    raise ValueError(f"{path}:{i}: <!-- continue --> with no python block before it")
                last_python.code += "\n" + body + "\n"
            else:
                last_python = Snippet(path, i + 1, lang, body + "\n", mark.group("reason") if kind == "skip" else None)
                snippets.append(last_python)
        elif lang in ("yaml", "yml"):
            snippets.append(Snippet(path, i + 1, "yaml", body + "\n", mark.group("reason") if kind == "skip" else None))
        i = end + 1
    return snippets


SNIPPETS = [s for path in DOCUMENTS for s in extract(path)]


def _close_leftovers(namespace: dict[str, object]) -> None:
    from gie_guard import Guard
    from gie_guard.serving.exposition import MetricsServer

    for value in namespace.values():
        if isinstance(value, (Guard, MetricsServer)):
            value.close()


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.lang == "python"], ids=lambda s: s.name)
def test_python_snippet_runs(snippet: Snippet, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if snippet.skip:
        pytest.skip(snippet.skip)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # guards built without metrics report to a registry of the snippet's own, not the global one
    monkeypatch.setattr(gie_guard.metrics, "REGISTRY", CollectorRegistry())
    namespace: dict[str, object] = {"__name__": "__snippet__"}
    try:
        exec(compile(snippet.code, snippet.name, "exec"), namespace)
    finally:
        _close_leftovers(namespace)


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.lang == "yaml"], ids=lambda s: s.name)
def test_yaml_snippet_loads(snippet: Snippet, tmp_path: pathlib.Path) -> None:
    if snippet.skip:
        pytest.skip(snippet.skip)
    data = yaml.safe_load(snippet.code)
    if not (isinstance(data, dict) and "concepts" in data):
        return  # not a policy (a Serve config, a manifest): parsing it is the check
    assert "name" in data, f"{snippet.name}: a policy example needs its name: (every policy has one)"
    from gie_guard.policy import load_policy

    path = tmp_path / "policy.yaml"
    path.write_text(snippet.code, encoding="utf-8")
    snapshot = load_policy(path)
    assert snapshot.name == data["name"]


def test_markers_are_understood() -> None:
    """A typo in a marker (<!-- contine -->) would silently run a block on its own."""
    for path in DOCUMENTS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"^\s*<!--\s*(cont|skip)", line):
                assert _MARK.match(line), f"{path.relative_to(REPO)}:{number}: unknown snippet marker {line.strip()!r}"
