"""Triton kernels; each launcher takes an SM budget `num_sms` and launches a persistent grid of at most that many programs."""
from minidu.kernels.activation import silu_and_mul
from minidu.kernels.decode_attention import decode_attention
from minidu.kernels.embedding import embedding
from minidu.kernels.gemm import gemm
from minidu.kernels.kv_cache import allocate_kv_cache, store_kvcache
from minidu.kernels.prefill_attention import prefill_attention
from minidu.kernels.rmsnorm import rms_norm
from minidu.kernels.rotary import rope_inv_freq, rotary_embedding
from minidu.kernels.sampling import sample

__all__ = ["allocate_kv_cache", "decode_attention", "embedding", "gemm", "prefill_attention", "rms_norm",
           "rope_inv_freq", "rotary_embedding", "sample", "silu_and_mul", "store_kvcache"]
