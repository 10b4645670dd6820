"""Chooses how Triton runs: compiled on CUDA, through its interpreter on CPU-only machines.

Triton reads TRITON_INTERPRET when it is imported, so this must run before anything imports triton.
"""
import logging
import os
import sys

# The interpreter runs kernels as many tiny numpy ops; multi-threaded BLAS only adds overhead to them.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

logger = logging.getLogger("minidu")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s minidu: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def configure_triton() -> bool:
    """Sets TRITON_INTERPRET=1 when CUDA is absent; returns whether kernels run interpreted."""
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            logger.warning("triton was imported before minidu without TRITON_INTERPRET=1; "
                           "kernels may fail on this CPU-only machine")
        os.environ["TRITON_INTERPRET"] = "1"
    logger.info("no CUDA device: Triton kernels run through the interpreter (TRITON_INTERPRET=1)")
    return True


INTERPRET = configure_triton()
