"""Paged attention for one decoder layer, once the batch's new k/v are in the cache (the rotary kernel stores them):
the prefill kernel on the prefill/extend tokens and the decode kernel on the decode tokens of the same flattened
batch."""
from dataclasses import dataclass

import torch

from minidu.kernels.decode_attention import decode_attention
from minidu.kernels.prefill_attention import prefill_attention


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token of a flattened batch goes in the paged cache and which keys its query sees.

    Tokens [0, num_prefill_tokens) belong to Bp prefill/extend requests (cu_seqlens_q delimits them); the remaining
    Bd tokens are decode tokens, one per request. Bp or Bd may be 0, and then their tensors are empty.
    """

    slot_mapping: torch.Tensor  # [T] int32, cache slot of every token (-1: not stored)
    num_prefill_tokens: int
    cu_seqlens_q: torch.Tensor  # [Bp + 1] int32
    prefill_seq_lens: torch.Tensor  # [Bp] int32, cached prefix + new tokens
    prefill_block_tables: torch.Tensor  # [Bp, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [Bd] int32, including the token being decoded
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int32

    @property
    def num_decode_tokens(self) -> int:
        return self.slot_mapping.shape[0] - self.num_prefill_tokens


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttentionMetadata, *,
                    scale: float, num_sms: int | None = None) -> torch.Tensor:
    """q [T, Hq, D] (a strided view of the fused qkv output) -> out [T, Hq, D] contiguous, over caches that already
    hold every token's k/v."""
    num_prefill = attn.num_prefill_tokens
    assert 0 <= num_prefill <= q.shape[0] == attn.slot_mapping.shape[0]
    assert attn.decode_seq_lens.shape[0] == q.shape[0] - num_prefill
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_prefill > 0:
        prefill_attention(q[:num_prefill], k_cache, v_cache, attn.cu_seqlens_q, attn.prefill_seq_lens,
                          attn.prefill_block_tables, scale=scale, num_sms=num_sms, out=out[:num_prefill])
    if attn.num_decode_tokens > 0:
        decode_attention(q[num_prefill:], k_cache, v_cache, attn.decode_seq_lens, attn.decode_block_tables,
                         scale=scale, num_sms=num_sms, out=out[num_prefill:])
    return out
