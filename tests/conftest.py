import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the dedup embedding cache goes to a throwaway folder, not the user's ~/.cache
import tempfile

os.environ.setdefault("GIE_GUARD_CACHE_DIR", tempfile.mkdtemp(prefix="gie-guard-test-cache-"))

import pathlib

import pytest
import torch

# One thread: on a shared 2-core machine two torch threads were 10-40x slower for these
# small models than one (measured while other jobs ran); alone, one thread costs little.
torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _release_owned_models():
    """Each test starts with no model owned by a guard: session pipelines wrapped by one test
    must not refuse the next test's raw calls."""
    yield
    from gie_guard.engine import ownership

    ownership._release_everything()


@pytest.fixture(scope="session")
def sd_pipe():
    from gie_guard.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def sdxl_pipe():
    from gie_guard.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, restored after (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): on a busy 2-core machine two threads
    spin-wait on each other (10-40x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
