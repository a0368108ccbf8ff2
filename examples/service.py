"""Your own pipeline and Guard behind gie-guard's HTTP service (FastAPI on uvicorn).

    pip install 'gie-guard[serve]'
    python examples/service.py                         # 127.0.0.1:8000 (EXAMPLE_PORT), header timeout 10 s
    uvicorn --app-dir examples service:app --port 8000  # the same app under plain uvicorn
    curl -s localhost:8000/v1/images -H 'Content-Type: application/json' -d '{"prompt": "a red circle", "seed": 1}'

``gie-guard serve --policy FILE --model shapes|DIR|module:function`` does the same from the
command line; write a module like this one when building the pipeline or the Guard takes
code of your own (a scheduler, LoRA weights, your own detector as a verifier). Several
workers (``uvicorn --workers 4 ...``) each load their own pipeline; set
``PROMETHEUS_MULTIPROC_DIR`` to an empty folder first so ``/metrics`` sums them all
(docs/deployment.md).

Environment: ``EXAMPLE_MODEL`` (``shapes``, the default, or ``tiny`` for the random test
pipeline), ``EXAMPLE_POLICY`` (a policy file, watched for changes; default: the shipped
``shapes-demo``), ``EXAMPLE_PORT`` (8000).
"""

from __future__ import annotations

import os

from gie_guard import Guard
from gie_guard.detectors import create as create_detector
from gie_guard.metrics import GuardMetrics
from gie_guard.serving import ImageService, ServeSettings, create_app

MODEL = os.environ.get("EXAMPLE_MODEL", "shapes")
POLICY = os.environ.get("EXAMPLE_POLICY", "shapes-demo")


def load_pipeline():
    """Called once per worker, in the background: /readyz says 503 until it returns."""
    import torch

    torch.set_num_threads(1)
    if MODEL == "tiny":
        from gie_guard.testing import tiny_sd_pipeline

        return tiny_sd_pipeline()
    from gie_guard.shapes import load_pipeline as load_shapes

    return load_shapes()  # or DiffusionPipeline.from_pretrained(...).to("cuda"), with your scheduler


def build_guard(metrics: GuardMetrics) -> Guard:
    """The Guard must report to ``metrics`` (the service reads each call's verifier outcome there)."""
    return Guard(
        policy=POLICY,
        watch=os.path.isfile(POLICY),  # a file is reloaded when it changes (rename swaps too)
        metrics=metrics,
        verifiers={"shapes": create_detector("shapes")} if MODEL == "shapes" else {},
    )


service = ImageService(
    load_pipeline,
    build_guard,
    ServeSettings(max_steps=50, max_images=4, max_batch_images=8, max_queue=32),
    description=f"example ({MODEL})",
)
app = create_app(service)


if __name__ == "__main__":
    import uvicorn

    from gie_guard.serving.http import server_config

    # gie_guard.serving.http: idle connections are closed after the header timeout and do not
    # count against the request limit (plain uvicorn has neither)
    config = server_config(app, host="127.0.0.1", port=int(os.environ.get("EXAMPLE_PORT", "8000")),
                           header_timeout_s=10.0, max_requests=256)
    uvicorn.Server(config).run()
