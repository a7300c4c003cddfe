"""Test configuration shared by the whole suite.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before any
synpo_kernels module is imported: without a CUDA device the Triton kernels run in the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(
        reason="needs a CUDA device (none here; these run in benchmarks/gpu_suite.sh)"
    )
    for item in items:
        # The marker itself, not `"cuda" in item.keywords`: keywords also hold test names and
        # parameter ids, which would skip CPU tests that merely mention CUDA.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-model tests: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.

    Tiny models are latency-bound: on a busy 2-core CI machine multi-threaded tiny ops oversubscribe
    the cores (4x slower measured), so these modules run on one thread (their subprocesses get
    OMP_NUM_THREADS=1).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
