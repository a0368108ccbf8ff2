"""Soak: many guarded generations with hot reloads, from several threads; does anything leak?

On the shapes-world UNet model, ``--threads`` threads share one Guard and one pipeline and
generate until ``--generations`` images are made. Every ``--reload-every`` generations the
policy file is rewritten (the concept's scale alternates, so the content hash changes) and
the soak waits for the file watcher to make the new policy live. The policy verifies every
image with the shapes detector (``verify: {verifier: shapes, action: record}``).

Measured: errors (any exception fails the run), reloads seen, resident memory (VmRSS) after
warm-up and at the end, open file descriptors and threads at the same two points, sampled
at every reload; generations per second.

    python benchmarks/soak.py --generations 1000 --out benchmarks/results/soak
    python benchmarks/soak.py --smoke --out /tmp/soak        # seconds (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import tempfile
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _common import markdown_table

from gie_guard import Guard
from gie_guard.detectors import create
from gie_guard.shapes import load_pipeline

POLICY = """\
name: soak
inhibit_steps: [0.0, 0.8]
concepts:
  - id: circle
    text: circle
    category: object
    scale: {scale}
    verify: {{verifier: shapes, action: record}}
"""
PROMPTS = ["a red circle", "a blue striped square", "a green dotted star", "a yellow triangle"]


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def sample(done: int) -> dict[str, Any]:
    gc.collect()
    return {"generations": done, "rss_mib": round(resident_mib(), 1), "open_files": open_files(),
            "os_threads": os_threads(), "python_threads": threading.active_count(), "time": time.perf_counter()}


def write_policy(path: pathlib.Path, scale: float) -> None:
    # rename-swap, as deployment tools write files
    tmp = path.with_suffix(".tmp")
    tmp.write_text(POLICY.format(scale=scale), encoding="utf-8")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    pipe = load_pipeline()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="gie-soak-"))
    path = folder / "policy.yaml"
    write_policy(path, 1.5)
    guard = Guard(policy=str(path), watch=True, verifiers={"shapes": create("shapes")}, name="soak")
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "errors": [], "reloads": 0, "reload_wait_s": []}
    samples: list[dict[str, Any]] = []
    warm = min(args.warmup, args.generations)
    reload_gate = threading.Condition(lock)
    pausing = {"on": False}

    def reload_now(done: int) -> None:
        before = guard.snapshot.content_hash
        write_policy(path, 1.5 if (done // args.reload_every) % 2 == 0 else 2.0)
        started = time.perf_counter()
        while guard.snapshot.content_hash == before:
            if time.perf_counter() - started > args.reload_timeout:
                raise RuntimeError(f"the watcher did not make the new policy live within {args.reload_timeout} s")
            time.sleep(0.02)
        state["reload_wait_s"].append(time.perf_counter() - started)
        state["reloads"] += 1

    def worker() -> None:
        while True:
            with lock:
                while pausing["on"]:
                    reload_gate.wait()
                if state["next"] >= args.generations or state["errors"]:
                    return
                index = state["next"]
                state["next"] += 1
            try:
                out = guard(pipe, prompt=PROMPTS[index % len(PROMPTS)], num_inference_steps=args.steps,
                            generator=torch.Generator().manual_seed(index), output_type="pil")
                assert out.guard_report.policy_hash and len(out.images) == 1
            except Exception as exc:  # any error fails the soak
                with lock:
                    state["errors"].append(f"generation {index}: {type(exc).__name__}: {exc}")
                return
            with lock:
                state["done"] += 1
                done = state["done"]
                boundary = done % args.reload_every == 0 or done == warm
                if boundary:
                    pausing["on"] = True
            if boundary:
                try:
                    if done == warm:
                        samples.append(sample(done))
                    if done % args.reload_every == 0 and done < args.generations:
                        reload_now(done)
                        samples.append(sample(done))
                except Exception as exc:
                    with lock:
                        state["errors"].append(f"reload after {done}: {type(exc).__name__}: {exc}")
                finally:
                    with lock:
                        pausing["on"] = False
                        reload_gate.notify_all()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"soak-{i}") for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    end = sample(state["done"])
    samples.append(end)
    guard.close()
    warm_sample = next((s for s in samples if s["generations"] == warm), samples[0])
    result = {
        "generations": state["done"], "threads": args.threads, "steps": args.steps, "reload_every": args.reload_every,
        "errors": state["errors"], "reloads": state["reloads"],
        "reload_wait_s_max": round(max(state["reload_wait_s"], default=0.0), 3),
        "warmup_generations": warm,
        "rss_growth_after_warmup_mib": round(end["rss_mib"] - warm_sample["rss_mib"], 1),
        "open_files_growth": end["open_files"] - warm_sample["open_files"],
        "os_threads_growth": end["os_threads"] - warm_sample["os_threads"],
        "generations_per_s": round(state["done"] / wall, 2), "wall_s": round(wall, 1),
        "samples": samples, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--reload-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=100, help="generations before the baseline sample")
    parser.add_argument("--reload-timeout", type=float, default=10.0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/soak"))
    parser.add_argument("--smoke", action="store_true", help="20 generations, a reload every 5, 4 steps: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.generations, args.reload_every, args.steps, args.warmup = 20, 5, 4, 5
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run(args)
    result["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    rows = [[s["generations"], s["rss_mib"], s["open_files"], s["os_threads"], s["python_threads"]] for s in result["samples"]]
    text = "\n".join([
        "# Soak: guarded generations with hot reloads",
        "",
        f"command: `{command}` ({result['wall_s']} s wall, {result['cpus']} CPUs, {result['date']}); shapes-world UNet, "
        f"{args.steps} steps, {args.threads} threads sharing one Guard and pipeline, a reload every "
        f"{args.reload_every} generations through the file watcher, the shapes verifier on every image.",
        "",
        markdown_table(["generations", "errors", "reloads", "max reload wait (s)", "RSS growth after warm-up (MiB)",
                        "open files growth", "OS threads growth", "generations/s"],
                       [[result["generations"], len(result["errors"]), result["reloads"], result["reload_wait_s_max"],
                         result["rss_growth_after_warmup_mib"], result["open_files_growth"], result["os_threads_growth"],
                         result["generations_per_s"]]]),
        "",
        f"Samples (baseline after {result['warmup_generations']} generations, then at every reload):",
        "",
        markdown_table(["generations", "RSS (MiB)", "open files", "OS threads", "Python threads"], rows),
        "",
    ] + ([f"errors: {e}" for e in result["errors"]] or []))
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
