"""Quiet logs: dependency loggers stay below INFO, prompt text never reaches WARNING."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# In a process of its own: the filters are process-wide and cannot be taken back.
SCRIPT = textwrap.dedent("""
    import json, logging, sys
    logging.getLogger("urllib3").setLevel(logging.INFO)  # configured by the user before
    root = logging.getLogger()
    root_before = (root.level, list(root.handlers), list(root.filters))
    from gie_guard.logs import install_log_filters
    install_log_filters()  # a guard built before diffusers loads the pipeline's module
    assert "diffusers" not in sys.modules
    import torch
    torch.set_num_threads(1)
    from gie_guard.testing import tiny_sd_pipeline

    class Catch(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []
        def emit(self, record):
            self.records.append((record.levelname, getattr(record, "demoted_from", None), record.getMessage()))

    pipe = tiny_sd_pipeline()
    catch = Catch()
    logging.getLogger("diffusers").addHandler(catch)   # an application's own handler
    PROMPT = " ".join(["word"] * 90) + " zebraquokka at sunset"

    def generate():
        install_log_filters()  # what the guard does before each call; idempotent
        catch.records.clear()
        pipe(prompt=PROMPT, num_inference_steps=1, output_type="np")
        return [(level, was, "zebraquokka" in message) for level, was, message in catch.records if "truncated" in message]

    result = {"installed": generate()}
    sys.stderr.write("--- debug ---\\n")
    logging.getLogger(type(pipe).__module__).setLevel(logging.DEBUG)   # a user who asks for DEBUG
    result["debug"] = generate()
    result["root_untouched"] = root_before == (root.level, list(root.handlers), list(root.filters))
    result["watchfiles"] = logging.getLevelName(logging.getLogger("watchfiles").level)
    result["urllib3"] = logging.getLevelName(logging.getLogger("urllib3").level)
    print(json.dumps(result))
""")


def test_prompt_text_warnings_are_demoted_below_warning():
    """A real tiny pipeline call with a prompt longer than the tokenizer's 77 tokens: diffusers
    logs the cut-off end of the prompt at WARNING; with the filters nothing of it reaches a
    handler or stderr, unless the user enables DEBUG for that logger."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["installed"] == []
    assert "zebraquokka" not in done.stderr.split("--- debug ---")[0]
    assert result["debug"] == [["DEBUG", "WARNING", True]]  # diffusers wrote it at WARNING
    assert result["root_untouched"] is True
    assert result["watchfiles"] == "WARNING"  # unset before: kept below INFO
    assert result["urllib3"] == "INFO"  # configured by the user: left alone


def test_the_filter_matches_exactly_the_prompt_text_records():
    import logging

    from gie_guard.logs import PromptTextFilter

    def record(message, level=logging.WARNING):
        return logging.LogRecord("diffusers.pipelines.x", level, __file__, 1, message, None, None)

    keep = [record("Token indices sequence length is longer than the specified maximum (102 > 77)"),
            record("the following part of your input was truncated because"),  # not diffusers' wording
            record("The following part of your input was truncated because CLIP ...", logging.DEBUG)]
    demote = [record("The following part of your input was truncated because CLIP can only handle sequences up to"
                     " 77 tokens: ['a prompt']"),
              record("The following part of your input was truncated because `max_sequence_length` is set to  256 "
                     "tokens: ['x']"),
              record("Your input was truncated because `max_sequence_length` is set to 512 tokens: ['x']", logging.ERROR)]
    for r in keep:
        level = r.levelno
        assert PromptTextFilter().filter(r) is True and r.levelno == level
    for r in demote:
        assert PromptTextFilter().filter(r) is False  # that logger is not enabled for DEBUG
        assert r.levelname == "DEBUG" and r.demoted_from in ("WARNING", "ERROR")


def test_building_a_guard_installs_the_filters():
    code = textwrap.dedent("""
        import logging
        from gie_guard import Guard
        from gie_guard.logs import PromptTextFilter
        Guard(policy={"name": "p", "concepts": []})
        print(any(isinstance(f, PromptTextFilter) for f in logging.getLogger("diffusers").filters),
              logging.getLevelName(logging.getLogger("watchfiles").level))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "WARNING"]


def test_library_loaders_print_no_warnings_or_bars_and_restore_the_settings():
    """A fresh process (nothing configured): gie_guard's loaders print neither transformers'
    torchvision warning nor a "Loading weights" bar, and leave both libraries as they were."""
    import os
    import subprocess
    import sys

    code = ("from gie_guard.testing import tiny_sd_pipeline\n"
            "from gie_guard.shapes import load_pipeline\n"
            "tiny_sd_pipeline(); load_pipeline()\n"
            "from transformers.utils import logging as t\n"
            "from diffusers.utils import logging as d\n"
            "print(t.get_verbosity(), t.is_progress_bar_enabled(), d.get_verbosity(), d.is_progress_bar_enabled())\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "requires torchvision" not in done.stderr and "Loading weights" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.split() == ["30", "True", "30", "True"]  # WARNING and bars on: as the libraries start
