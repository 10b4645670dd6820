"""Chooses how Triton runs: compiled on CUDA, through its interpreter on CPU-only machines.

Triton reads TRITON_INTERPRET when it is imported, so this module must be imported before triton: every kernel module
imports it first, and `import minidu` imports it too.
"""
import contextlib
import functools
import logging
import os
import sys

logger = logging.getLogger("minidu")


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


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # finding the loaded BLAS libraries takes ~10 ms: once


def interpreter_blas():
    """Single-threaded BLAS while the interpreter runs a forward pass (and nothing else: no environment variable).
    Its tl.dot is a numpy matmul of one tile, too small to pay for waking BLAS threads; on a 2-core machine shared
    with other work, two threads made those matmuls 5 to 70 times slower. Compiled kernels: nothing to do."""
    return _blas_controller().limit(limits=1, user_api="blas") if INTERPRET else contextlib.nullcontext()
