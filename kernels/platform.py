"""Chooses how Triton runs: compiled on CUDA, through its interpreter on CPU-only machines.

Triton reads TRITON_INTERPRET when it is imported, so this module must be imported before triton: every kernel module
imports it first, and `import minidu` imports it too.
"""
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
