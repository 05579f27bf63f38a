"""Test tiers.

tier 0 (unmarked): references vs float64 math, autograd, opcheck, bad input. Always runs.
tier 1 (@pytest.mark.interpret): Triton kernels at small odd shapes, on CPU tensors through
    the Triton interpreter, or on CUDA tensors when a GPU is present.
tier 2 (@pytest.mark.gpu): full shapes and dtypes on a GPU; skipped without CUDA.

The interpreter flag is read when a @triton.jit function is defined, so it is set here,
before any test module imports a kernel. Nothing here touches CUDA at import time beyond
asking the driver whether a device exists.
"""

import os

import pytest
import torch

_HAS_GPU = torch.cuda.is_available()
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not _HAS_GPU:
        pytest.skip("tier 2: needs a CUDA device")


@pytest.fixture
def triton_device() -> str:
    """Where tier-1 tests run Triton kernels: "cuda" on a GPU, "cpu" under the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    if _HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("no GPU and TRITON_INTERPRET is not 1")


@pytest.fixture
def cuda_device() -> str:
    if not _HAS_GPU:
        pytest.skip("needs a CUDA device")
    return "cuda"


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """The smoke preset's synthetic corpus, written once per test module that runs the trainer."""
    from speedrun import data
    from speedrun.config import build_config, synthetic_spec

    d = tmp_path_factory.mktemp("smoke_data")
    data.ensure_synthetic(d, synthetic_spec(build_config("smoke", {})), log=lambda m: None)
    return d
