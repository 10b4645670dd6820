"""minidu: a compact LLM serving engine whose model arithmetic runs in Triton kernels that take an SM budget."""
from minidu._platform import INTERPRET

__all__ = ["INTERPRET"]
