"""Paged prefill attention: causal flash attention for a variable-length batch of new tokens over each request's
cached prefix plus the new tokens themselves, reading every key and value from the paged KV cache."""
import math

import torch
import triton
import triton.language as tl

from minidu.kernels.kv_cache import check_paged_attention_inputs
from minidu.kernels import tiles as tile_table
from minidu.kernels.tiles import cuda_prefill_tiles_within_registers, kv_heads_per_tile
from minidu.kernels.utils import (INDEX_DTYPES, INTERPRET, check_tensor, index_dtype_is_wide, next_power_of_2,
                                  num_programs)

LOG2E = math.log2(math.e)

@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hk, D]
    v_cache_ptr,  # [num_blocks, block_size, Hk, D]
    out_ptr,  # [T, Hq, D]
    cu_seqlens_q_ptr,  # [B + 1]
    seq_lens_ptr,  # [B]
    block_tables_ptr,  # [B, max_blocks]
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    num_seqs, num_kv_heads, kv_tiles, num_tiles, NUM_PROGRAMS,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, KV_PER_TILE: tl.constexpr, SEQS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    # Index math in int64 only where it must be (see index_dtype_is_wide in kernels/utils.py): int32 otherwise, which
    # keeps the compiled kernel's registers from spilling.
    IDX: tl.constexpr = tl.int64 if WIDE_INDEX else tl.int32
    pid = tl.program_id(0)
    # One tile row per (new token, query head of the tile's KV_PER_TILE kv heads), heads fastest: the K/V tiles are
    # loaded once for all GROUP query heads that share them. Key columns are KV_PER_TILE strips of BLOCK_N keys, one
    # per kv head, and a row only scores its own kv head's strip (a block-diagonal mask; all-true with one kv head
    # per tile, as on CUDA). Rows of padding kv heads borrow the last real one so no row is masked out entirely.
    rows = tl.arange(0, BLOCK_M * KV_PER_TILE * GROUP_PAD).to(IDX)
    row_tok = rows // (KV_PER_TILE * GROUP_PAD)
    row_kv = (rows // GROUP_PAD) % KV_PER_TILE
    row_head = rows % GROUP_PAD
    cols = tl.arange(0, KV_PER_TILE * BLOCK_N).to(IDX)
    col_kv = cols // BLOCK_N
    col_keys = cols % BLOCK_N
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    seqs = tl.arange(0, SEQS_PAD).to(IDX)
    seq_mask = seqs < num_seqs
    last_kv = tl.cast(num_kv_heads, IDX) - 1
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        tile_id = tl.cast(tile, IDX)
        slot = tile_id // kv_tiles
        first_kv = (tile_id % kv_tiles) * KV_PER_TILE
        # Request b owns q-block slots cu_seqlens_q[b] // BLOCK_M + b + [0, cdiv(q_len_b, BLOCK_M)); these ranges
        # are disjoint and increasing in b, so the owner of `slot` is the last request whose first slot is <= slot.
        first_slots = tl.load(cu_seqlens_q_ptr + seqs, mask=seq_mask, other=0) // BLOCK_M + seqs
        req = tl.sum(((first_slots <= slot) & seq_mask).to(IDX), 0) - 1
        q_start = tl.load(cu_seqlens_q_ptr + req).to(IDX)
        q_len = tl.load(cu_seqlens_q_ptr + req + 1).to(IDX) - q_start
        q_block = slot - (q_start // BLOCK_M + req)
        if q_block * BLOCK_M < q_len:
            seq_len = tl.load(seq_lens_ptr + req).to(IDX)
            tok = q_block * BLOCK_M + row_tok
            pos = seq_len - q_len + tok
            head = (first_kv + row_kv) * GROUP + row_head
            row_mask = (tok < q_len) & (row_head < GROUP) & (first_kv + row_kv <= last_kv)
            io_mask = row_mask[:, None] & dim_mask[None, :]
            cache_heads = first_kv + col_kv
            head_mask = cache_heads <= last_kv
            same_kv = tl.minimum(first_kv + row_kv, last_kv)[:, None] == cache_heads[None, :]
            q_rows = q_start + tok
            q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                        mask=io_mask, other=0.0)
            m_i = tl.full([BLOCK_M * KV_PER_TILE * GROUP_PAD], float("-inf"), tl.float32)
            l_i = tl.full([BLOCK_M * KV_PER_TILE * GROUP_PAD], 0.0, tl.float32)
            acc = tl.full([BLOCK_M * KV_PER_TILE * GROUP_PAD, HEAD_DIM_PAD], 0.0, tl.float32)
            # Key 0 is visible to every row (padding rows included), so the running max is finite after the first
            # block and exp2 never sees (-inf) - (-inf).
            kv_end = tl.minimum(seq_len, seq_len - q_len + (q_block + 1) * BLOCK_M)
            block_table = block_tables_ptr + req * stride_bt
            for kv_start in tl.range(0, kv_end, BLOCK_N):
                keys = kv_start + col_keys
                key_mask = (keys < kv_end) & head_mask
                # Padding entries of the block table lie past seq_len and are never loaded.
                block = tl.load(block_table + keys // BLOCK_SIZE, mask=key_mask, other=0).to(IDX)
                offset = keys % BLOCK_SIZE
                k_mask = key_mask[None, :] & dim_mask[:, None]
                k = tl.load(k_cache_ptr + (block * stride_kb + offset * stride_kt + cache_heads * stride_kh)[None, :]
                            + dims[:, None], mask=k_mask, other=0.0)  # [D_PAD, COLS]
                s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
                s = tl.where((keys[None, :] <= pos[:, None]) & key_mask[None, :] & same_kv, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_cache_ptr + (block * stride_vb + offset * stride_vt + cache_heads * stride_vh)[:, None]
                            + dims[None, :], mask=key_mask[:, None] & dim_mask[None, :], other=0.0)  # [COLS, D_PAD]
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new
            out = acc / l_i[:, None]
            tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _check_inputs(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out, num_sms) -> None:
    check_paged_attention_inputs(q, k_cache, v_cache, seq_lens, block_tables, out, num_sms)
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=INDEX_DTYPES, device=q.device, contiguous=True,
                 shape=(seq_lens.shape[0] + 1,))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens: torch.Tensor, block_tables: torch.Tensor, *, scale: float,
                      num_sms: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of new tokens q [T, Hq, D] over their requests' paged K/V; returns out [T, Hq, D].

    Request b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; its seq_lens[b] keys (cached prefix + new tokens, all
    already in the cache) are found through block_tables[b]. New token j sits at position seq_lens[b] - q_len + j.
    """
    _check_inputs(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out, num_sms)
    if out is None:
        out = torch.empty_like(q)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad, head_dim_pad = next_power_of_2(group), max(16, next_power_of_2(head_dim))
    kv_per_tile = kv_heads_per_tile(num_kv_heads)
    tiles = (tile_table.interpret_prefill_tiles(group_pad, kv_per_tile) if INTERPRET else
             cuda_prefill_tiles_within_registers(group_pad, head_dim_pad, q.element_size()))
    # The number of q-blocks per request depends on data in cu_seqlens_q; reading it would sync the host with the
    # GPU and break CUDA-graph capture. Instead every request gets slots from the shape-derived bound
    # T // BLOCK_M + B (see the kernel), and the at most B slots nobody owns exit at once.
    kv_tiles = triton.cdiv(num_kv_heads, kv_per_tile)
    num_tiles = (num_tokens // tiles.block_m + num_seqs) * kv_tiles
    grid = num_programs(num_tiles, num_sms, q.device)
    _prefill_attention_kernel[(grid,)](
        q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        scale * LOG2E,
        num_seqs, num_kv_heads, kv_tiles, num_tiles, grid,
        GROUP=group, GROUP_PAD=group_pad, KV_PER_TILE=kv_per_tile, SEQS_PAD=next_power_of_2(num_seqs),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WIDE_INDEX=index_dtype_is_wide(q, out, k_cache, v_cache, block_tables),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
