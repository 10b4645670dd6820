"""Triton kernels; each launcher takes an SM budget `num_sms` and launches a persistent grid of at most that many programs.

Import launchers from their modules (`from minidu.kernels.gemm import gemm`): several share their module's name, so a
re-export here would shadow the module."""
