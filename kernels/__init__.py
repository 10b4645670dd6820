"""Triton kernels; each launcher takes an SM budget `num_sms` and launches a persistent grid of at most that many programs."""
