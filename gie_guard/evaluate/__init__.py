"""``gie-guard evaluate``: numbers on your own model before a policy goes live.

Generates each prompt of an unsafe and a benign set unguarded and guarded (same seeds), judges
both with a detector, and reports removal, residual, preservation and cost per policy
(docs/evaluate.md). One module per job:

- :mod:`.prompts`: CSV prompt sets (strict reading, seeds, filters);
- :mod:`.models`: the model (``shapes``, ``shapes-dit``, a local diffusers folder);
- :mod:`.generate`: generation with resume (``records.jsonl`` and PNGs in the output folder);
- :mod:`.judge`: the judge and each concept's labels; :mod:`.clipscore`: optional CLIP score;
- :mod:`.measures`: removal, residual, MS-SSIM, false positives, cost;
- :mod:`.report`: ``results.json``, ``report.md``, ``report.html``;
- :mod:`.run`: the run (:func:`evaluate`); :mod:`.shapes`: prompt sets for the shapes model and
  the cross-check against ``benchmarks/erasure.py``.

Importing this package imports neither torch nor diffusers.
"""

from .run import EvaluateConfig, evaluate

__all__ = ["EvaluateConfig", "evaluate"]
