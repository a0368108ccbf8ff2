"""Hot reload while generations run: every generation uses exactly one complete policy."""

import os
import threading
import time

import torch

from gie_guard import Guard
from gie_guard.testing import tiny_sd_pipeline

VALID = """name: live
version: "{k}"
inhibit_steps: [0.0, 1.0]
concepts:
  - {{id: beach, text: beach, scale: {k}.0}}
  - {{id: cat, text: cat, scale: {k}.0}}
"""
BROKEN = "name: live\nconcepts:\n  - {id: beach, text: beach, scale: [oops\n"


def test_reload_under_load(tmp_path, monkeypatch):
    # Rename swaps are atomic, so a short settle interval is enough here; 50 swaps at the
    # default 0.5 s would only make the test slower.
    monkeypatch.setattr("gie_guard.policy.store.DEFAULT_SETTLE_S", 0.1)
    path = tmp_path / "policy.yaml"
    path.write_text(VALID.format(k=1))
    guard = Guard(policy=str(path), watch=True)
    pipes = [tiny_sd_pipeline(seed=i) for i in range(2)]  # 4 threads on 2 pipelines: shared and parallel
    reports, errors = [], []
    done = threading.Event()

    def generate(pipe):
        while not done.is_set():
            try:
                guard(pipe, prompt="a cat on a beach", num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0))
                reports.append(guard.last_report)
            except Exception as exc:  # any error a generating thread sees fails the test
                errors.append(exc)

    threads = [threading.Thread(target=generate, args=(pipes[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    last_valid = 1
    try:
        for n in range(50):  # valid and broken versions alternate; editors swap files by rename
            k = n + 2
            content = VALID.format(k=k) if n % 2 == 0 else BROKEN
            last_valid = k if n % 2 == 0 else last_valid
            failures = guard.store.state.failed_count
            tmp = tmp_path / f".policy.{n}.tmp"
            tmp.write_text(content)
            os.replace(tmp, path)
            # the watcher (not this test) reloads; wait until it has handled this version
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if n % 2 == 0 and guard.policy.policy.version == str(k):
                    break
                if n % 2 == 1 and guard.store.state.failed_count > failures:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError(f"the watcher did not handle replacement {n} within 10 s")
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
        guard.close()

    assert not errors, errors[:3]
    assert len(reports) >= 8
    # the last valid policy is live, and broken files were seen and refused
    assert guard.policy.policy.version == str(last_valid)
    assert guard.store.state.failed_count == 25
    # every generation applied one complete policy: all its concepts at that version's scale
    seen = set()
    for report in reports:
        scales = {s for c in report.concepts for s in c.token_scales}
        assert report.concept_ids == ("beach", "cat") and len(scales) == 1, report
        seen.add(scales.pop())
    assert len(seen) >= 3, seen  # generations really ran across several reloads
