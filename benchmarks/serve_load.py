"""Load test of the guarded image service on Ray Serve, on loopback, with a policy swap.

    python benchmarks/serve_load.py --replicas 2 --requests 200 --concurrency 8 --out DIR
    python benchmarks/serve_load.py --smoke --out DIR     # one replica, tiny model, 6 requests: seconds (CI)

Starts a local Ray cluster and a Serve deployment of gie_guard.serving (the shapes-world
model by default) on 127.0.0.1, sends ``--requests`` requests with ``--concurrency`` in
flight (each bounded by ``--timeout``, the whole run by ``--max-seconds``; it stops by
itself), and halfway replaces the policy file the way the kubelet updates a ConfigMap volume
(a new timestamped folder, then one rename of the ``..data`` link; ``--swap rename`` renames a
file over the policy instead). It also deploys the same model, settings and batching
unguarded (``--no-unguarded`` skips it) and alternates the two loads in ``--rounds`` rounds,
so that background load on the machine weighs on both alike; throughput is ok answers per
second of each mode's own load time. Then it waits until the metrics say every replica
serves the new policy, sends probe requests until every replica has answered with it, and
scrapes ``/metrics`` once (the replicas' values summed through the multi-process directory).
Writes ``DIR/results.json`` and ``DIR/results.md``.

results.json: ``requests`` (sent), ``ok`` (200), ``errors`` (any other HTTP answer but 451),
``lost`` (no HTTP answer at all), ``blocked`` (451), ``p50_s``/``p95_s`` (latency of ``ok``
requests), ``throughput_rps`` (ok per second of the load phase), ``unguarded_throughput_rps``,
``guarded_over_unguarded``, ``policies_seen`` (content hashes in the responses' reports, in
order of first appearance), ``policy_sequence`` (run lengths by completion time), plus the
checks: ``incomplete_reports``, ``after_swap``, ``metrics``, and the machine.

tests/test_serving_ray.py runs a small version (tiny model, 2 replicas) and checks it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import platform
import shutil
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = ("a red circle", "a blue square", "a green star", "a yellow triangle", "a purple cross",
           "a striped red circle", "a dotted blue star", "a plain green square")

_POLICY = """\
name: serve-load
version: "{version}"
description: policy {when} the swap (benchmarks/serve_load.py)
dedup_threshold: 0.0
inhibit_steps: [0.0, 0.8]
concepts:
  - {{id: circle, text: circle, scale: 1.5}}
"""
POLICY_A = _POLICY.format(version="1", when="before")
POLICY_B = _POLICY.format(version="2", when="after") + "  - {id: star, text: star, scale: 1.0}\n"


@dataclass
class LoadConfig:
    out: str
    replicas: int = 2
    requests: int = 200
    concurrency: int = 8
    model: str = "shapes"
    steps: int = 20
    timeout_s: float = 120.0
    max_seconds: float = 900.0
    unguarded: bool = True
    max_batch_images: int = 8
    torch_threads: int = 1
    probe_rounds: int = 2  # answers with the new policy wanted from each replica
    swap: str = "configmap"  # how the policy is replaced: "configmap" (kubelet's ..data swap) or "rename"
    rounds: int = 3  # guarded and unguarded loads alternate in this many rounds


@dataclass
class Record:
    index: int
    started: float
    ended: float = 0.0
    status: int | None = None  # None: no HTTP answer (lost)
    policy_hash: str | None = None
    concept_ids: tuple[str, ...] = ()
    replica: str | None = None
    batch_requests: int | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Phase:
    records: list[Record] = field(default_factory=list)
    not_sent: int = 0
    wall_s: float = 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _one(port: int, path: str, index: int, steps: int, timeout: float) -> Record:
    record = Record(index=index, started=time.perf_counter())
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "seed": index, "steps": steps}
    try:
        status, headers, payload = _post(port, path, body, timeout)
    except (OSError, http.client.HTTPException) as exc:
        record.ended = time.perf_counter()
        record.error = type(exc).__name__
        return record
    record.ended = time.perf_counter()
    record.status = status
    record.replica = headers.get("x-gie-guard-replica")
    try:
        report = json.loads(payload).get("report") or {}
    except ValueError:
        report = {}
    record.policy_hash = report.get("policy_hash")
    record.concept_ids = tuple(c["id"] for c in report.get("concepts", ()))
    record.batch_requests = report.get("batch_requests")
    if status not in (200, 451):
        record.error = payload[:200].decode("utf-8", "replace")
    return record


def load(port: int, path: str, *, requests: int, concurrency: int, steps: int, timeout: float, deadline: float,
         after_sent: Any = None, first_index: int = 0) -> Phase:
    """``requests`` requests (indices from ``first_index``) with at most ``concurrency`` in
    flight; ``after_sent(index)`` runs after each is sent. Nothing is sent after
    ``deadline`` (perf_counter)."""
    phase = Phase()
    slots = threading.BoundedSemaphore(concurrency)
    lock = threading.Lock()
    started = time.perf_counter()

    def task(index: int) -> None:
        try:
            record = _one(port, path, index, steps, timeout)
            with lock:
                phase.records.append(record)
        finally:
            slots.release()

    with ThreadPoolExecutor(concurrency) as pool:
        for i in range(requests):
            slots.acquire()
            if time.perf_counter() > deadline:
                slots.release()
                phase.not_sent = requests - i
                break
            pool.submit(task, first_index + i)
            if after_sent is not None:
                after_sent(first_index + i)
    phase.wall_s = time.perf_counter() - started
    phase.records.sort(key=lambda r: r.ended)
    return phase


def swap_policy(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` by rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.swap")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ConfigMapVolume:
    """A folder laid out and updated the way the kubelet updates a ConfigMap volume: the
    files live in a timestamped folder, ``..data`` links to it, each file name links into
    ``..data``; an update writes a new timestamped folder, points ``..data_tmp`` at it and
    renames ``..data_tmp`` over ``..data`` (one atomic rename), then removes the old folder."""

    def __init__(self, folder: pathlib.Path, files: dict[str, str]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.update(files)
        for name in files:
            link = folder / name
            if not link.is_symlink():
                link.symlink_to(pathlib.Path("..data") / name)

    def update(self, files: dict[str, str]) -> None:
        stamp = self.folder / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.perf_counter_ns() % 10**9:09d}"
        stamp.mkdir()
        for name, text in files.items():
            (stamp / name).write_text(text, encoding="utf-8")
        data = self.folder / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.folder / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.rename(tmp, data)
        if old:
            shutil.rmtree(self.folder / old)


def scrape(port: int) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def _total(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for l, v in samples.get(name, ()) if all(l.get(k) == x for k, x in labels.items()))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _wait_for_policy(port: int, old: str, new: str, timeout: float) -> dict[str, float]:
    """Poll /metrics until policy_info shows the new hash at 1 and the old at 0 (the max over
    live replicas: every replica has swapped)."""
    deadline = time.perf_counter() + timeout
    info: dict[str, float] = {}
    while time.perf_counter() < deadline:
        samples = scrape(port)
        info = {l["content_hash"]: v for l, v in samples.get("gie_guard_policy_info", ())}
        if info.get(new) == 1.0 and info.get(old, 0.0) == 0.0:
            break
        time.sleep(0.25)
    return info


def _probe(port: int, *, replicas: int, rounds: int, steps: int, timeout: float, first_index: int) -> list[Record]:
    """Requests until every replica answered ``rounds`` times (bounded)."""
    records: list[Record] = []
    index = first_index
    for _ in range(20 * rounds):
        with ThreadPoolExecutor(2 * replicas) as pool:
            batch = list(pool.map(lambda i: _one(port, "/v1/images", i, steps, timeout), range(index, index + 2 * replicas)))
        index += 2 * replicas
        records.extend(batch)
        counts: dict[str | None, int] = {}
        for r in records:
            counts[r.replica] = counts.get(r.replica, 0) + 1
        if len([k for k, c in counts.items() if k and c >= rounds]) >= replicas:
            break
    return records


def _summary(phase: Phase) -> dict[str, Any]:
    ok = [r for r in phase.records if r.status == 200]
    latencies = sorted(r.seconds for r in ok)
    return {
        "requests": len(phase.records), "not_sent": phase.not_sent, "ok": len(ok),
        "errors": sum(1 for r in phase.records if r.status is not None and r.status not in (200, 451)),
        "lost": sum(1 for r in phase.records if r.status is None),
        "blocked": sum(1 for r in phase.records if r.status == 451),
        "p50_s": _percentile(latencies, 0.50), "p95_s": _percentile(latencies, 0.95),
        "throughput_rps": len(ok) / phase.wall_s if phase.wall_s else None, "wall_s": phase.wall_s,
        "mean_batch_requests": statistics.fmean(r.batch_requests for r in ok if r.batch_requests) if ok else None,
    }


def _unguarded_factory(spec: Any) -> Any:
    """The benchmark's baseline: the same service and batching, but the pipeline called
    without the guard. Never use this outside a benchmark."""
    from gie_guard.report import GuardedOutput, GuardReport
    from gie_guard.serving.service import ImageService

    class UnguardedService(ImageService):
        def _call_pipeline(self, kwargs: dict[str, Any]) -> Any:
            out = self.pipe(**kwargs)
            report = GuardReport(policy_name="unguarded", policy_hash="", pipeline_class=type(self.pipe).__name__,
                                 concepts=(), steps_inhibited=(), total_steps=kwargs["num_inference_steps"],
                                 step_window=(0.0, 0.0), classifier_free_guidance=None, added_seconds=0.0, call_seconds=0.0)
            return GuardedOutput(out, report)

    built = spec.build()
    return UnguardedService(built._pipeline_factory, built._guard_factory, spec.settings, description="unguarded baseline")


def run(config: LoadConfig) -> dict[str, Any]:
    import ray
    from ray import serve

    from gie_guard.policy import load_policy
    from gie_guard.serving import ServeSettings, ServiceSpec
    from gie_guard.serving.ray import build_app, start_local_ray
    from gie_guard.serving.schemas import concept_label

    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    policy_dir = out / "policy"
    shutil.rmtree(policy_dir, ignore_errors=True)
    check_dir = out / "policy-check"
    check_dir.mkdir(exist_ok=True)
    (check_dir / "a.yaml").write_text(POLICY_A, encoding="utf-8")
    (check_dir / "b.yaml").write_text(POLICY_B, encoding="utf-8")
    before, after = load_policy(str(check_dir / "a.yaml")), load_policy(str(check_dir / "b.yaml"))
    shutil.rmtree(check_dir)
    if config.swap == "configmap":
        volume = ConfigMapVolume(policy_dir, {"policy.yaml": POLICY_A})
        policy_path = policy_dir / "policy.yaml"
        swap = lambda: volume.update({"policy.yaml": POLICY_B})  # noqa: E731
    else:
        policy_dir.mkdir()
        policy_path = policy_dir / "policy.yaml"
        policy_path.write_text(POLICY_A, encoding="utf-8")
        swap = lambda: swap_policy(policy_path, POLICY_B)  # noqa: E731
    # the reports name concepts by their opaque labels (ServeSettings.concept_ids)
    expected = {before.content_hash: tuple(concept_label(before.name, c.id) for c in before.concepts),
                after.content_hash: tuple(concept_label(after.name, c.id) for c in after.concepts)}
    metrics_dirs = {name: out / f"metrics-{name}" for name in ("guarded", "unguarded")}
    for folder in metrics_dirs.values():
        shutil.rmtree(folder, ignore_errors=True)

    settings = ServeSettings(max_steps=max(50, config.steps), default_steps=config.steps, replica_header=True,
                             max_batch_images=config.max_batch_images, max_queue=max(32, 2 * config.concurrency),
                             torch_threads=config.torch_threads)
    spec = ServiceSpec(model=config.model, policy=str(policy_path), watch=True, device="cpu", settings=settings)
    port = _free_port()
    load_before = os.getloadavg()
    started = time.perf_counter()
    deadline = started + config.max_seconds
    if __name__ != "__main__":
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the unguarded factory travels by value
    # a small object store: requests and answers travel over HTTP, not through Ray's objects
    # on 127.0.0.1 (start_local_ray), with Serve's health checks patient with a busy machine
    start_local_ray(num_cpus=max(2, 2 * config.replicas), log_to_driver=False, object_store_memory=256 * 2**20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(spec, replicas=config.replicas, metrics_dir=str(metrics_dirs["guarded"]), name="guarded"),
                  name="guarded", route_prefix="/")

        unguarded = Phase() if config.unguarded else None
        if config.unguarded:
            serve.run(build_app(spec, replicas=config.replicas, metrics_dir=str(metrics_dirs["unguarded"]),
                                name="unguarded", service_factory=_unguarded_factory),
                      name="unguarded", route_prefix="/unguarded")
        ready_s = time.perf_counter() - started

        # Guarded and unguarded loads alternate in rounds, so that what else runs on the
        # machine weighs on both alike; the policy is swapped after half of the guarded
        # requests were sent.
        guarded = Phase()
        rounds = max(1, config.rounds if config.unguarded else 1)
        sizes = [config.requests // rounds + (1 if r < config.requests % rounds else 0) for r in range(rounds)]
        swap_at = config.requests // 2 - 1

        def after_sent(index: int) -> None:
            if index == swap_at:
                swap()

        sent = 0
        for size in sizes:
            for mode, phase in (("guarded", guarded), ("unguarded", unguarded)):
                if phase is None or size == 0:
                    continue
                part = load(port, "/v1/images" if mode == "guarded" else "/unguarded/v1/images", requests=size,
                            concurrency=config.concurrency, steps=config.steps, timeout=config.timeout_s,
                            deadline=deadline, after_sent=after_sent if mode == "guarded" else None, first_index=sent)
                phase.records.extend(part.records)
                phase.not_sent += part.not_sent
                phase.wall_s += part.wall_s
            sent += size
        guarded.records.sort(key=lambda r: r.ended)
        if swap_at < 0:
            swap()
        info = _wait_for_policy(port, before.content_hash, after.content_hash, timeout=120.0)  # a bound, not a target
        probes = _probe(port, replicas=config.replicas, rounds=config.probe_rounds, steps=config.steps,
                        timeout=config.timeout_s, first_index=config.requests)
        samples = scrape(port)
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = _summary(guarded)
    sequence: list[list[Any]] = []
    for r in guarded.records:
        if r.status == 200:
            if sequence and sequence[-1][0] == r.policy_hash:
                sequence[-1][1] += 1
            else:
                sequence.append([r.policy_hash, 1])
    answered = [r for r in guarded.records + probes if r.status == 200]
    incomplete = [r.index for r in answered if expected.get(r.policy_hash or "") != r.concept_ids]
    replicas_after: dict[str, list[str]] = {}
    for r in probes:
        if r.status == 200 and r.replica:
            replicas_after.setdefault(r.replica, []).append(r.policy_hash or "")
    calls = sum((Fraction(1, r.batch_requests) for r in answered if r.batch_requests), Fraction(0))
    metrics = {
        "serve_requests_total": {l["outcome"]: v for l, v in samples.get("gie_guard_serve_requests_total", ()) if v},
        "serve_requests_sum": _total(samples, "gie_guard_serve_requests_total"),
        "serve_images_total": _total(samples, "gie_guard_serve_images_total"),
        "generations_total": _total(samples, "gie_guard_generations_total"),
        "generations_ok": _total(samples, "gie_guard_generations_total", outcome="ok"),
        "guarded_calls_from_responses": float(calls),
        "serve_ready": _total(samples, "gie_guard_serve_ready"),
        "policy_info": info,
        "reloads": {l["result"]: v for l, v in samples.get("gie_guard_policy_reloads_total", ()) if v},
    }
    unguarded_rps = _summary(unguarded)["throughput_rps"] if unguarded is not None else None
    results = {
        **{k: summary[k] for k in ("requests", "ok", "errors", "lost", "blocked", "p50_s", "p95_s", "throughput_rps")},
        "unguarded_throughput_rps": unguarded_rps,
        "guarded_over_unguarded": (summary["throughput_rps"] / unguarded_rps) if unguarded_rps and summary["throughput_rps"] else None,
        "policies_seen": list(dict.fromkeys(h for h, _ in sequence)),
        "policy_sequence": sequence,
        "policy_hashes": {"before": before.content_hash, "after": after.content_hash},
        "not_sent": summary["not_sent"],
        "load_wall_s": summary["wall_s"],
        "mean_batch_requests": summary["mean_batch_requests"],
        "incomplete_reports": incomplete,
        "probe_requests": len(probes),
        "probe_ok": sum(1 for r in probes if r.status == 200),
        "after_swap": {"replicas": replicas_after,
                       "all_new": bool(replicas_after) and all(h == after.content_hash for hs in replicas_after.values() for h in hs)},
        "metrics": metrics,
        "unguarded": _summary(unguarded) if unguarded is not None else None,
        "error_samples": sorted({r.error for r in guarded.records + probes if r.error})[:10],
        "config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "python": platform.python_version(), "platform": platform.platform(), **_versions()},
        "ready_s": ready_s,
        "wall_s": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(results) + "\n", encoding="utf-8")
    return results


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "ray", "fastapi", "uvicorn", "diffusers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    config = results["config"]
    header = ("| replicas | requests | ok | errors | lost | blocked | p50 s | p95 s | guarded rps | unguarded rps "
              "| guarded / unguarded | policies seen |")
    row = (f"| {config['replicas']} | {results['requests']} | {results['ok']} | {results['errors']} | {results['lost']} "
           f"| {results['blocked']} | {_fmt(results['p50_s'])} | {_fmt(results['p95_s'])} | {_fmt(results['throughput_rps'])} "
           f"| {_fmt(results['unguarded_throughput_rps'])} | {_fmt(results['guarded_over_unguarded'])} "
           f"| {' -> '.join(h[:8] for h in results['policies_seen'])} |")
    return "\n".join([header, "|" + "---|" * 12, row])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="shapes", help="shapes (default), tiny, or what gie-guard serve --model takes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this many seconds per phase")
    parser.add_argument("--max-batch-images", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--no-unguarded", action="store_true", help="skip the unguarded baseline")
    parser.add_argument("--rounds", type=int, default=3, help="guarded and unguarded loads alternate in this many rounds")
    parser.add_argument("--swap", choices=("configmap", "rename"), default="configmap",
                        help="replace the policy as the kubelet updates a ConfigMap volume (default) or by one rename")
    parser.add_argument("--smoke", action="store_true",
                        help="one replica, the tiny model, 6 requests of 2 steps, no unguarded baseline: checks it runs, "
                             "measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.replicas, args.requests, args.concurrency, args.model, args.steps, args.rounds = 1, 6, 3, "tiny", 2, 1
        args.no_unguarded = True  # one deployment: Ray's start-up is most of the time
    if min(args.replicas, args.requests, args.concurrency, args.steps) < 1:
        parser.error("--replicas, --requests, --concurrency and --steps must be at least 1")
    results = run(LoadConfig(
        out=args.out, replicas=args.replicas, requests=args.requests, concurrency=args.concurrency, model=args.model,
        steps=args.steps, timeout_s=args.timeout, max_seconds=args.max_seconds, unguarded=not args.no_unguarded,
        max_batch_images=args.max_batch_images, torch_threads=args.torch_threads, swap=args.swap,
        rounds=args.rounds,
    ))
    print(markdown(results))
    print(json.dumps({k: results[k] for k in ("requests", "ok", "errors", "lost", "blocked", "after_swap")}, indent=1))
    return 0 if results["lost"] == 0 and results["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
