"""Test-wide settings: hypothesis profiles (`quick` by default, `thorough` with MINIDU_HYPOTHESIS_PROFILE=thorough) and
the one device every kernel test runs on."""
import os

# The interpreter runs kernels as many tiny numpy ops, where multi-threaded BLAS only adds overhead (set before numpy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import minidu  # noqa: F401  (sets TRITON_INTERPRET before any test imports triton)
from hypothesis import HealthCheck, settings

settings.register_profile("quick", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("MINIDU_HYPOTHESIS_PROFILE", "quick"))

THOROUGH = os.environ.get("MINIDU_HYPOTHESIS_PROFILE") == "thorough"
# Where kernels run: compiled on CUDA, else through Triton's interpreter on CPU tensors.
DEVICE = torch.device("cpu" if minidu.INTERPRET else "cuda")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device kernel tests put their tensors on (a session fixture, so hypothesis tests may take it)."""
    return DEVICE


def to_device(t: torch.Tensor) -> torch.Tensor:
    """`t` on DEVICE with its strides kept (a strided view stays strided): itself when already there."""
    if t.device == DEVICE:
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE).copy_(t)
