"""PolicyStore(validate=...): one place where the Guard checks a candidate policy before
it goes live (verifier names, encodable concepts); a refusal is a failed reload."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gie_guard.errors import ConceptError, GuardError, PolicyError
from gie_guard.policy import PolicySnapshot, PolicyStore, ReloadEvent


def text(version: int, concept: str = "car") -> str:
    return f"name: v\nversion: '{version}'\ndedup_threshold: 0\nconcepts: [{{id: a, text: {concept}, scale: 2}}]\n"


@pytest.fixture
def path(tmp_path) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text(1), encoding="utf-8")
    return p


class NoTrucks:
    """Refuses any policy that mentions a truck, the way the Guard refuses a concept its
    pipelines cannot encode."""

    def __init__(self, error: type[Exception] = ConceptError) -> None:
        self.error = error
        self.seen: list[PolicySnapshot] = []

    def __call__(self, snapshot: PolicySnapshot) -> None:
        self.seen.append(snapshot)
        if any(c.text == "truck" for c in snapshot.concepts):
            raise self.error("truck cannot be encoded by the served pipelines")


def test_validator_sees_the_first_snapshot_and_every_candidate(path):
    check = NoTrucks()
    with PolicyStore(path, validate=check) as store:
        assert check.seen == [store.current]
        path.write_text(text(2), encoding="utf-8")
        assert store.reload() is True
        assert check.seen[-1] is store.current and len(check.seen) == 2
        path.write_text(text(2) + "# only a comment\n", encoding="utf-8")
        assert store.reload() is True and len(check.seen) == 2  # unchanged content: nothing to swap


@pytest.mark.parametrize("error", [ConceptError, PolicyError, GuardError, RuntimeError, KeyError])
def test_a_refused_reload_is_a_failed_reload(path, error):
    check = NoTrucks(error)
    events: list[ReloadEvent] = []
    with PolicyStore(path, validate=check) as store:
        store.add_listener(events.append)
        good = store.current
        path.write_text(text(2, "truck"), encoding="utf-8")
        assert store.reload() is False
        assert store.current is good  # the last good policy stays live
        assert store.state.failed_count == 1 and store.state.last_result == "failure"
        assert "truck cannot be encoded" in store.state.last_error
        assert isinstance(events[-1].error, PolicyError) and events[-1].result == "failure"
        if error is not PolicyError:
            assert isinstance(events[-1].error.__cause__, error)
        path.write_text(text(3), encoding="utf-8")
        assert store.reload() is True and store.current.policy.version == "3"


@pytest.mark.parametrize("error", [ConceptError, PolicyError, RuntimeError])
def test_a_refused_first_policy_raises_the_validators_error(path, error):
    path.write_text(text(1, "truck"), encoding="utf-8")
    with pytest.raises(error, match="truck cannot be encoded"):
        PolicyStore(path, validate=NoTrucks(error))


@pytest.mark.parametrize("mode", [True, "poll"])
def test_the_watcher_counts_refusals_too(path, mode):
    with PolicyStore(path, watch=mode, poll_interval=0.1, validate=NoTrucks()) as store:
        path.write_text(text(2, "truck"), encoding="utf-8")
        deadline = time.monotonic() + 60
        while store.state.failed_count == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.state.failed_count == 1 and store.current.policy.version == "1"
        path.write_text(text(3), encoding="utf-8")
        while store.current.policy.version != "3" and time.monotonic() < deadline + 60:
            time.sleep(0.02)
        assert store.current.policy.version == "3" and store.watching


def test_validate_must_be_callable(path):
    with pytest.raises(ValueError, match="validate must be callable"):
        PolicyStore(path, validate="yes")  # type: ignore[arg-type]
