"""gunicorn settings for a multi-process service that uses gie_guard metrics.

    export PROMETHEUS_MULTIPROC_DIR=/run/myservice/prometheus   # empty directory, set before start
    gunicorn -c examples/gunicorn.conf.py myservice.wsgi:app

Each worker creates its Guard as usual (default registry); the app's /metrics route returns
``gie_guard.serving.exposition(accept=...)``, which sums all workers' values from the directory.
See docs/observability.md, "Multi-process servers".
"""

import os
import pathlib
import shutil

workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
bind = os.environ.get("BIND", "127.0.0.1:8000")


def on_starting(server):
    """Start from an empty metrics directory (never wipe it while workers run)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        raise RuntimeError("set PROMETHEUS_MULTIPROC_DIR to an empty directory before starting gunicorn")
    shutil.rmtree(path, ignore_errors=True)
    pathlib.Path(path).mkdir(parents=True)


def child_exit(server, worker):
    """A dead worker's live gauges (livemin/livemax) must stop counting."""
    from gie_guard.serving import mark_process_dead

    mark_process_dead(worker.pid)
