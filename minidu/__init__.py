"""minidu: a compact LLM serving engine whose model arithmetic runs in Triton kernels that take an SM budget."""
from minidu.kernels.platform import INTERPRET


def __getattr__(name: str):
    # Engine pulls in triton and the kernels; import it lazily so `import minidu` stays light.
    if name == "Engine":
        from minidu.engine import Engine

        return Engine
    if name in ("SamplingParams", "RequestOutput"):
        from minidu import outputs, sampling_params

        return getattr(sampling_params if name == "SamplingParams" else outputs, name)
    raise AttributeError(f"module 'minidu' has no attribute {name!r}")


__all__ = ["INTERPRET", "Engine", "SamplingParams", "RequestOutput"]
