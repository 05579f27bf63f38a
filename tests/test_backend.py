"""Backend resolution: names, the environment variable, and the reasons a backend cannot run."""

import pytest
import torch

import kernels
from kernels.backend import BackendUnavailable, resolve_backend, why_unavailable

CPU = torch.device("cpu")


def test_reference_always_available():
    assert "reference" in kernels.available_backends()
    assert kernels.available_backends("cpu")[0] == "reference"


def test_auto_picks_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    for op in ("newton_schulz", "fp8_head", "relu2_mlp"):
        assert resolve_backend(op, None, CPU) == "reference"
        assert resolve_backend(op, "auto", CPU) == "reference"


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match=r"backend: unknown backend 'tritonn'.*'reference', 'triton', 'cuda'"):
        kernels.relu2_mlp(torch.randn(3, 4), torch.randn(8, 4), torch.randn(4, 8), backend="tritonn")
    with pytest.raises(TypeError, match="backend: expected a str"):
        kernels.newton_schulz(torch.randn(4, 4), backend=3)


def test_env_var_sets_the_default(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "reference")
    assert resolve_backend("relu2_mlp", None, CPU) == "reference"
    monkeypatch.setenv("KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$KERNELS_BACKEND: unknown backend 'bogus'"):
        kernels.newton_schulz(torch.randn(4, 4))
    # An explicit argument wins over the variable.
    assert resolve_backend("relu2_mlp", "reference", CPU) == "reference"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = why_unavailable("triton", CPU)
    assert "TRITON_INTERPRET=1" in reason
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        resolve_backend("relu2_mlp", "triton", CPU)


def test_cuda_backend_says_why_it_cannot_run():
    reason = why_unavailable("cuda", CPU)
    assert reason  # on a CPU machine: not built, or no CUDA tensors / device
    with pytest.raises(BackendUnavailable, match="cannot run"):
        resolve_backend("relu2_mlp", "cuda", CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_tensors_without_a_device_say_so():
    reason = why_unavailable("triton", torch.device("cuda"))
    assert reason in ("no CUDA device", "triton is not installed")


def test_backend_without_an_implementation_is_reported(monkeypatch):
    monkeypatch.setattr("kernels.backend._has_module", lambda backend, op: False)
    assert "has no implementation of relu2_mlp" in why_unavailable("triton", CPU, "relu2_mlp")
