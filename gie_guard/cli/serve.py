"""``gie-guard serve``: guarded image generation over HTTP (gie_guard.serving).

    gie-guard serve --policy nsfw --model shapes                  # uvicorn, one process
    gie-guard serve --policy policy.yaml --model DIR --workers 4  # uvicorn workers, metrics summed
    gie-guard serve --policy policy.yaml --ray --replicas 2       # Ray Serve replicas

Prints ``listening on http://HOST:PORT`` once the port is bound (``--port 0`` picks a free
one); ``GET /readyz`` answers 200 once the pipeline is loaded (with ``--ray``, the line comes
after the replicas are ready). SIGTERM or Ctrl-C stops it after the requests in progress.
Needs ``pip install 'gie-guard[serve]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import tempfile
import threading
from typing import Any

from ..errors import ConfigurationError, MissingDependencyError

__all__ = ["register"]

log = logging.getLogger("gie_guard.serving")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("serve", help="serve guarded image generation over HTTP (uvicorn, or Ray Serve with --ray)",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="nsfw", help="shipped policy name or YAML file (default: nsfw); files are watched")
    p.add_argument("--model", "--pipeline", dest="model", default="shapes", metavar="MODEL",
                   help="'shapes', 'tiny', 'auto', a local diffusers folder, or module:function (default: shapes)")
    p.add_argument("--weights", metavar="DIR", help="folder of shapes-world weights (default: the packaged ones)")
    p.add_argument("--no-watch", action="store_true", help="do not reload the policy file when it changes")
    p.add_argument("--poll", action="store_true", help="watch the policy file by polling (NFS and other file systems without events)")
    p.add_argument("--policy-root", action="append", default=[], metavar="DIR", help="extra folder policy includes may reach")
    p.add_argument("--verifier", action="append", default=[], metavar="NAME",
                   help="a detector the policy's verify keys may name: shapes, nudenet, module:attr or NAME=module:attr")
    p.add_argument("--device", default="auto", help="torch device of the pipeline (default: cuda when available, else cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--settings", metavar="FILE", help="JSON or YAML file of ServeSettings (limits, batching, disclosure)")
    p.add_argument("--max-batch-images", type=int, help="most images in one guarded pipeline call")
    p.add_argument("--max-queue", type=int, help="requests admitted at once per process; more get 503")
    p.add_argument("--max-steps", type=int, help="most denoising steps a request may ask")
    p.add_argument("--default-steps", type=int, help="steps when a request names none")
    p.add_argument("--max-images", type=int, help="most images per request")
    p.add_argument("--torch-threads", type=int, help="torch threads per process")
    p.add_argument("--expose-concept-text", action="store_true",
                   help="put concept texts and scales in responses (hands clients the blocklist)")
    p.add_argument("--replica-header", action="store_true", help="name the answering process in an X-Gie-Guard-Replica header")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    one = p.add_argument_group("one machine (uvicorn)")
    one.add_argument("--workers", type=int, default=1, help="worker processes, each with its own pipeline (default: 1)")
    one.add_argument("--max-connections", "--max-requests", dest="max_connections", type=int, default=256,
                     help="requests in progress per worker before the server answers 503; idle connections do not "
                          "count (they are closed after --header-timeout) and /healthz, /readyz are never refused "
                          "(default: 256)")
    one.add_argument("--header-timeout", type=float, metavar="SECONDS",
                     help="close a connection whose request headers are not complete this long after it opened or "
                          "was last answered (default: 10)")
    one.add_argument("--metrics-dir", metavar="DIR",
                     help="multi-process metrics folder (wiped at start); default: a new temporary folder when "
                          "there are several workers or replicas, unless PROMETHEUS_MULTIPROC_DIR is set")
    many = p.add_argument_group("many replicas (Ray Serve)")
    many.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment")
    many.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default: 1)")
    many.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default: 1)")
    many.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default: 0; 1 for one GPU each)")
    many.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    for name in ("workers", "replicas", "max_connections"):
        if getattr(args, name) < 1:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be at least 1")
    if args.ray and args.workers != 1:
        raise ConfigurationError("--workers is for uvicorn; with --ray use --replicas")
    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"--port must be within [0, 65535], got {args.port}")
    from ..logs import quiet_cli

    quiet_cli()  # before torch, diffusers and transformers load (workers and replicas inherit it)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "fastapi", "serve", needed_for="gie-guard serve") from exc
    spec = _spec(args)
    _logging(args.log_level)
    if args.ray:
        return _serve_ray(args, spec)
    return _serve_uvicorn(args, spec)


def _spec(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from ..serving.schemas import ServeSettings
    from ..serving.service import ServiceSpec
    from .pipelines import pipeline_kind

    pipeline_kind(args.model, args.weights)  # a clear error now for a --model that names nothing
    if not os.path.isfile(args.policy):
        from ..policy import load_policy

        load_policy(args.policy)  # PolicyNotFoundError/PolicyError now, not in every worker
    values: dict[str, Any] = {}
    if args.settings:
        values = _read_settings(args.settings)
    for name in ("max_batch_images", "max_queue", "max_steps", "default_steps", "max_images", "torch_threads"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.header_timeout is not None:
        values["header_timeout_s"] = args.header_timeout
    if args.expose_concept_text:
        values["expose_concept_text"] = True
    if args.replica_header:
        values["replica_header"] = True
    try:
        settings = ServeSettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid serve settings: {problems}") from None
    watch: Any = False if args.no_watch else ("poll" if args.poll else True)
    return ServiceSpec(model=args.model, weights=args.weights, policy=args.policy, watch=watch,
                       policy_roots=args.policy_root, verifiers=args.verifier, device=args.device, settings=settings)


def _read_settings(path: str) -> dict[str, Any]:
    text = pathlib.Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: serve settings must be a mapping")
    return data


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config for every worker: our loggers and uvicorn's on stderr
    (uvicorn's own access log is off: the app logs paths without query strings)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {"uvicorn": {"level": level.upper()}, "uvicorn.access": {"level": "WARNING"}},
    }


def _metrics_dir(args: argparse.Namespace, needed: bool) -> str | None:
    """The multi-process folder: --metrics-dir (wiped), PROMETHEUS_MULTIPROC_DIR as set, or a
    new temporary folder when several processes serve."""
    from ..serving.exposition import MULTIPROC_ENV

    if args.metrics_dir:
        shutil.rmtree(args.metrics_dir, ignore_errors=True)
        os.makedirs(args.metrics_dir)
        folder: str = os.path.abspath(args.metrics_dir)
        return folder
    if os.environ.get(MULTIPROC_ENV):
        return os.environ[MULTIPROC_ENV]
    return tempfile.mkdtemp(prefix="gie-guard-metrics-") if needed else None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve_uvicorn(args: argparse.Namespace, spec: Any) -> int:
    import uvicorn

    from ..serving.app import SPEC_ENV
    from ..serving.exposition import MULTIPROC_ENV
    from ..serving.http import server_config

    folder = _metrics_dir(args, needed=args.workers > 1)
    if folder:
        os.environ[MULTIPROC_ENV] = folder  # before any worker imports prometheus_client
    os.environ[SPEC_ENV] = spec.model_dump_json()
    sock = _bind(args.host, args.port)
    # uvicorn's limit_concurrency would count idle connections, and it has no header timeout:
    # gie_guard.serving.http adds both, in the protocol (docs/deployment.md, "Slow and idle clients")
    config = server_config(
        "gie_guard.serving.app:app_from_env", factory=True, workers=args.workers, access_log=False,
        log_config=_log_config(args.log_level), max_requests=args.max_connections,
        header_timeout_s=spec.settings.header_timeout_s, timeout_graceful_shutdown=300, timeout_keep_alive=5,
        lifespan="on",
    )
    host, port = sock.getsockname()[:2]
    log.info("serving model %s with policy %s on %s (%d worker(s)%s)", spec.model, spec.policy, _url(args.host, port),
             args.workers, f", metrics in {folder}" if folder else "")
    print(f"listening on {_url(args.host, port)}", flush=True)
    server = uvicorn.Server(config)
    try:
        if args.workers == 1:
            server.run(sockets=[sock])
        else:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
    return 0


def _serve_ray(args: argparse.Namespace, spec: Any) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MissingDependencyError("ray", "serve", needed_for="gie-guard serve --ray") from exc
    from ..serving.ray import build_app, start_local_ray

    port = args.port
    if port == 0:
        probe = _bind(args.host, 0)
        port = probe.getsockname()[1]
        probe.close()
    local = args.ray_address is None
    if local:
        # a cluster on 127.0.0.1 when serving on loopback: nothing of Ray's leaves the machine
        start_local_ray(num_cpus=max(os.cpu_count() or 1, 1), loopback=_is_loopback(args.host))
    else:
        ray.init(address=args.ray_address, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": port})
        folder = args.metrics_dir
        if folder and local:
            shutil.rmtree(folder, ignore_errors=True)
        app = build_app(spec, replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                        metrics_dir=os.path.abspath(folder) if folder else "auto")
        serve.run(app, name="gie-guard", route_prefix="/")
        print(f"listening on {_url(args.host, port)}", flush=True)
        _wait_for_signal()
    finally:
        if local:
            serve.shutdown()  # type: ignore[no-untyped-call]  # unannotated in ray
            ray.shutdown()
        else:
            serve.delete("gie-guard")
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(1.0):
        pass

