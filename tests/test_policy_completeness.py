"""A policy is complete or it is not a policy, and no policy change is ever lost: a file
cut short is refused, emptying a live policy needs `allow_empty: true`, a reload that fails
for a reason other than its content is retried until it succeeds, and compiles never share
a tokenizer with other users of the pipeline."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gie_guard import Guard, GuardMetrics, PolicyError, load_policy
from gie_guard.policy import PolicyStore

ONE = "name: p\nconcepts:\n  - {id: beach, text: beach, scale: 2.0}\n"
TWO = "name: p\nversion: '2'\nconcepts:\n  - {id: beach, text: beach, scale: 2.0}\n  - {id: sky, text: sky, scale: 2.0}\n"


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_a_file_without_concepts_is_not_a_policy(tmp_path):
    cut = tmp_path / "cut.yaml"
    cut.write_text("name: nsfw-v7\nversion: '7'\n")
    with pytest.raises(PolicyError, match="no 'concepts' key") as info:
        load_policy(cut)
    assert info.value.file == str(cut) and info.value.line == 2 and info.value.place == "concepts"
    with pytest.raises(PolicyError, match="no 'concepts' key"):
        load_policy({"name": "x"})
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: nothing\nconcepts: []\n")
    assert load_policy(empty).concepts == ()


def test_a_file_cut_short_on_reload_keeps_the_live_policy(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(ONE)
    store = PolicyStore(path)
    path.write_text("name: p\n")  # the writer died after the first line
    assert store.reload() is False
    assert [c.id for c in store.current.concepts] == ["beach"]
    assert "no 'concepts' key" in store.state.last_error and not store.state.pending


def test_emptying_a_live_policy_needs_allow_empty(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(ONE)
    store = PolicyStore(path)
    path.write_text("name: p\nconcepts: []\n")
    assert store.reload() is False and len(store.current.concepts) == 1
    assert "allow_empty: true" in store.state.last_error
    path.write_text("name: p\nconcepts:\n  - {id: beach, text: beach, scale: 2.0, enabled: false}\n")
    assert store.reload() is False and len(store.current.concepts) == 1  # all disabled is none, too
    path.write_text("name: p\nallow_empty: true\nconcepts: []\n")
    assert store.reload() is True and store.current.concepts == ()
    path.write_text("name: p\nconcepts: []\n")  # empty to empty needs nothing
    assert store.reload() is True


def test_a_reload_that_fails_for_another_reason_is_retried_until_it_succeeds(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(ONE)
    failures = []

    def validate(snapshot):
        if len(snapshot.concepts) == 2 and len(failures) < 2:
            failures.append(time.monotonic())
            raise RuntimeError("Tensor size mismatch (a component was busy)")

    registry = CollectorRegistry()
    metrics = GuardMetrics(registry)
    store = PolicyStore(path, validate=validate)
    metrics.track(store, guard="g")
    events = []
    store.add_listener(events.append)
    path.write_text(TWO)
    assert store.reload() is False
    assert store.state.pending and store.state.pending_since is not None
    assert 'gie_guard_policy_reload_pending{guard="g",policy="p"} 1.0' in generate_latest(registry).decode()
    wait_for(lambda: len(store.current.concepts) == 2)  # retried by itself, no file change
    assert len(failures) == 2 and not store.state.pending and store.state.retries == 0
    assert [e.result for e in events] == ["failure", "failure", "success"]
    assert 'gie_guard_policy_reload_pending{guard="g",policy="p"} 0.0' in generate_latest(registry).decode()
    store.close()


def test_a_content_failure_is_not_retried_and_ends_a_pending_retry(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(ONE)
    calls = []

    def validate(snapshot):
        calls.append(len(snapshot.concepts))
        if len(snapshot.concepts) == 2:
            raise RuntimeError("busy")

    store = PolicyStore(path, validate=validate)
    path.write_text(TWO)
    assert store.reload() is False and store.state.pending
    path.write_text("name: p\nconcepts: [{id: sky, text: sky, scale: -1}]\n")  # the content itself is wrong
    assert store.reload() is False and not store.state.pending
    before = len(calls)
    time.sleep(1.2)  # past the first retry delay: nothing runs again
    assert len(calls) == before and len(store.current.concepts) == 1
    store.close()


def test_reload_compiles_do_not_share_the_tokenizer_with_other_users(tmp_path):
    """A service counting prompt tokens on the pipeline's tokenizer while the watcher compiles a
    reload: the compile uses its own copy, so neither sees the other's padding settings."""
    from gie_guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    path = tmp_path / "p.yaml"
    path.write_text(ONE)
    guard = Guard(policy=str(path), exclusive=False)
    guard(pipe, prompt="a beach", num_inference_steps=1, output_type="np")  # served: reloads compile for it
    stop = threading.Event()
    counted = []

    def count_tokens():
        tokenizer = pipe.tokenizer
        while not stop.is_set():
            counted.append(len(tokenizer(["a", "a long prompt about a beach"], padding="longest",
                                         max_length=5, truncation=True).input_ids[1]))

    worker = threading.Thread(target=count_tokens)
    worker.start()
    try:
        for i in range(6):
            path.write_text(TWO.replace("'2'", f"'{i + 2}'") if i % 2 == 0 else ONE.replace("p\n", "p\nversion: x\n", 1))
            assert guard.reload() is True, guard.store.state.last_error
    finally:
        stop.set()
        worker.join(30)
    assert counted and set(counted) == {5}
    guard.close()
