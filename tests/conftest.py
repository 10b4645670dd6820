"""Test-wide settings: hypothesis profiles (`quick` by default, `thorough` with MINIDU_HYPOTHESIS_PROFILE=thorough)."""
import os

# The interpreter runs kernels as many tiny numpy ops, where multi-threaded BLAS only adds overhead (set before numpy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import minidu  # noqa: F401  (sets TRITON_INTERPRET before any test imports triton)
from hypothesis import HealthCheck, settings

settings.register_profile("quick", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("MINIDU_HYPOTHESIS_PROFILE", "quick"))
