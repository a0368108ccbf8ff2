"""Hot reload with real files: swap on change, keep the last good policy on errors."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from gie_guard.errors import PolicyError
from gie_guard.policy import PolicyStore, ReloadEvent, default_embedder

GOOD = "name: live\nconcepts:\n  - {id: car, text: car, scale: 2}\n"
GOOD_REFORMATTED = "# same content\nname: live\nconcepts: [{scale: 2.0, id: car, text: car}]\n"
CHANGED = "name: live\nconcepts:\n  - {id: car, text: car, scale: 4}\n  - {id: boat, text: boat, scale: 1}\n"
BROKEN = "name: live\nconcepts:\n  - {id: car, text: car, scale: -4}\n"


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


@pytest.fixture
def policy_file(tmp_path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD, encoding="utf-8")
    return path


def _replace(path: Path, content: str) -> None:
    """Write like editors and Kubernetes do: a new file renamed over the old one."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(content, encoding="utf-8")
    os.replace(temp, path)


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_valid_broken_valid(policy_file, embedder, caplog):
    events: list[ReloadEvent] = []
    with PolicyStore(policy_file, embedder=embedder) as store:
        store.add_listener(events.append)
        first = store.current
        assert store.state.ok_count == 1 and store.state.last_result == "success"

        policy_file.write_text(BROKEN, encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger="gie_guard.policy"):
            assert store.reload() is False
        assert store.current is first  # the last good policy stays live
        assert store.state.failed_count == 1 and "concepts[0].scale" in store.state.last_error
        assert "policy reload failed" in caplog.text

        policy_file.write_text(CHANGED, encoding="utf-8")
        assert store.reload() is True
        assert store.current is not first and [c.scale for c in store.current.concepts] == [4.0, 1.0]
        assert store.state.ok_count == 2 and store.state.last_result == "success"

    assert [e.result for e in events] == ["failure", "success"]
    assert isinstance(events[0].error, PolicyError) and events[0].snapshot is first
    assert events[1].error is None and events[1].snapshot is store.current


def test_unchanged_content_does_not_swap(policy_file, embedder):
    with PolicyStore(policy_file, embedder=embedder) as store:
        first = store.current
        policy_file.write_text(GOOD_REFORMATTED, encoding="utf-8")
        assert store.reload() is True
        assert store.current is first
        assert store.state.unchanged_count == 1 and store.state.last_result == "unchanged"


def test_broken_file_at_start_raises(tmp_path, embedder):
    path = tmp_path / "policy.yaml"
    path.write_text(BROKEN, encoding="utf-8")
    with pytest.raises(PolicyError, match="concepts\\[0\\].scale"):
        PolicyStore(path, embedder=embedder)


def test_listener_errors_do_not_break_reload(policy_file, embedder):
    def bad_listener(event):
        raise RuntimeError("listener bug")

    with PolicyStore(policy_file, embedder=embedder) as store:
        remove = store.add_listener(bad_listener)
        policy_file.write_text(CHANGED, encoding="utf-8")
        assert store.reload() is True
        remove()
        assert store.reload() is True


@pytest.mark.parametrize("watch", [True, "poll"])
def test_watcher_sees_rename_swaps(policy_file, embedder, watch):
    results: list[str] = []
    with PolicyStore(policy_file, watch=watch, embedder=embedder, poll_interval=0.1) as store:
        store.add_listener(lambda e: results.append(e.result))
        assert store.watching
        first = store.current
        time.sleep(0.2)  # let the watcher arm

        _replace(policy_file, CHANGED)
        assert _wait_for(lambda: store.current is not first)
        assert len(store.current.concepts) == 2

        second = store.current
        _replace(policy_file, BROKEN)
        assert _wait_for(lambda: store.state.failed_count == 1)
        assert store.current is second

        _replace(policy_file, GOOD)
        assert _wait_for(lambda: store.current.content_hash == first.content_hash)
        (policy_file.parent / "unrelated.txt").write_text("x")  # folder noise: no reload
        time.sleep(0.3)
    assert results == ["success", "failure", "success"]


def test_watcher_sees_included_file_changes(tmp_path, embedder):
    (tmp_path / "base").mkdir()
    base = tmp_path / "base" / "common.yaml"
    base.write_text("name: common\nconcepts: [{id: car, text: car, scale: 1}]\n", encoding="utf-8")
    top = tmp_path / "top.yaml"
    top.write_text("name: top\ninclude: [base/common.yaml]\nconcepts: []\n", encoding="utf-8")
    with PolicyStore(top, watch=True, embedder=embedder, poll_interval=0.1) as store:
        time.sleep(0.2)
        _replace(base, "name: common\nconcepts: [{id: car, text: car, scale: 3}]\n")
        assert _wait_for(lambda: store.current.concepts[0].scale == 3.0)


@pytest.mark.parametrize("watch", [True, "poll"])
def test_close_is_prompt(policy_file, embedder, watch):
    store = PolicyStore(policy_file, watch=watch, embedder=embedder, poll_interval=5.0)
    time.sleep(0.1)
    store.close()
    assert not store.watching


def test_watch_needs_a_file(embedder):
    with pytest.raises(ValueError, match="needs a policy file"):
        PolicyStore({"name": "x"}, watch=True, embedder=embedder)


def test_a_reload_that_changes_only_verify_takes_effect(tmp_path):
    from gie_guard.policy import PolicyStore

    path = tmp_path / "p.yaml"
    base = "name: p\ndedup_threshold: 0\nconcepts:\n  - {id: a, text: circle, scale: 3.0%s}\n"
    path.write_text(base % "")
    with PolicyStore(str(path)) as store:
        first = store.current
        path.write_text(base % ", verify: {verifier: shapes, action: block}")
        assert store.reload()
        assert store.current.content_hash != first.content_hash
        assert store.current.policy.concepts[0].verify.action == "block"
