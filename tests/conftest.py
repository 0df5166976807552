import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through the interpreter (tiny sizes); must be set before they load
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dlengine.testing import tiny_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """DLENGINE_TEST_TIMEOUT_S=N: a test still running after N seconds fails with a TimeoutError
    and the run goes on (a GPU run with a fixed time budget then reports every other test)."""
    limit = int(os.environ.get("DLENGINE_TEST_TIMEOUT_S", "0") or 0)
    if limit <= 0:
        yield
        return
    import signal

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past DLENGINE_TEST_TIMEOUT_S={limit}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def tiny_qwen3() -> str:
    return tiny_checkpoint("qwen3")


def make_prompts(n: int = 10, lengths=(1, 2, 5, 16, 17, 31, 64, 100, 200, 300), vocab: int = 512, seed: int = 0):
    """Token-id prompts of the given lengths (ids >= 2 so no prompt holds pad/eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (L,), generator=g).tolist() for L in lengths[:n]]
