"""Paged decode attention (flash-decoding): one query per request attends to its whole paged KV history; the keys are
cut into splits of a fixed number of keys whose partial results a second kernel merges by log-sum-exp, one split
after another, so a request's output never depends on the other requests of its batch or on its block table's width."""
import math

import torch
import triton
import triton.language as tl

from minidu.kernels.kv_cache import check_paged_attention_inputs
from minidu.kernels import tiles as tile_table
from minidu.kernels.utils import INTERPRET, check_tensor, index_dtype_is_wide, next_power_of_2, num_programs

LOG2E = math.log2(math.e)
# tl.max and tl.sum are @jit helpers: the interpreter re-patches triton.language on every call of one (~0.5 ms, as much
# as 20 ops). On 32- and 64-bit inputs, as here, they are exactly tl.reduce with these combine functions, which the
# interpreter runs as one numpy reduction (compiled, the PTX is the same).
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine

# Paths of the split kernel that cost the interpreter fewer ops (HOST_SPLITS, ALL_KV_HEADS, KV_ROWS, EVEN_D,
# ONE_STEP); tests switch them off to run the compiled kernels' path through the interpreter.
INTERPRET_PATHS = INTERPRET


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hk, D]
    v_cache_ptr,  # [num_blocks, block_size, Hk, D]
    partial_out_ptr,  # [B, Hq, num_splits, D] float32, normalized within the split; unused if SINGLE_SPLIT
    partial_lse_ptr,  # [B, Hq, num_splits] float32, base-2 log-sum-exp of the split's scaled scores; same
    out_ptr,  # [B, Hq, D]; written only if SINGLE_SPLIT
    seq_lens_ptr,  # [B]
    block_tables_ptr,  # [B, max_blocks]
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    stride_bt,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    partition_size,  # keys per split
    num_seqs, num_kv_heads, kv_tiles, num_splits, NUM_PROGRAMS,
    GROUP: tl.constexpr, KV_PER_TILE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SEQS_PAD: tl.constexpr, SINGLE_SPLIT: tl.constexpr, WIDE_INDEX: tl.constexpr,
    HOST_SPLITS: tl.constexpr, ALL_KV_HEADS: tl.constexpr, KV_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
    ONE_STEP: tl.constexpr,
):
    # Interpreter-only paths (False when compiled): HOST_SPLITS, num_splits is already the number of splits holding
    # keys (the host read seq_lens); ALL_KV_HEADS, one tile serves every kv head of its request, so heads and masks
    # are the same for every tile; KV_ROWS, K and V share strides, so one [COLS, D_PAD] offset tile and mask serve
    # both loads and the scores use K transposed; EVEN_D, HEAD_DIM == HEAD_DIM_PAD, so no column mask; ONE_STEP, no
    # split holds more than BLOCK_N keys, so the softmax needs no rescaling (the online one's first step, bitwise).
    # Index math in int64 only where it must be (see index_dtype_is_wide in kernels/utils.py): int32 otherwise, which
    # keeps the compiled kernel's registers from spilling.
    IDX: tl.constexpr = tl.int64 if WIDE_INDEX else tl.int32
    pid = tl.program_id(0)
    # Only splits that hold keys of the batch's longest context get tiles: the grid is sized for the block tables'
    # capacity (fixed under CUDA graphs), the work follows the real contexts, whatever the SM budget.
    if HOST_SPLITS:
        active_splits = tl.cast(num_splits, IDX)
    else:
        seqs = tl.arange(0, SEQS_PAD)
        longest = tl.reduce(tl.load(seq_lens_ptr + seqs, mask=seqs < num_seqs, other=0), 0, _MAX).to(IDX)
        active_splits = tl.minimum(tl.maximum((longest + partition_size - 1) // partition_size, 1), num_splits)
    num_tiles = tl.cast(num_seqs, IDX) * kv_tiles * active_splits
    # A tile serves KV_PER_TILE kv heads and the GROUP query heads sharing each (padded to BLOCK_H >= 16 rows for
    # tl.dot), so each K/V tile is loaded once per kv head. Its key columns are KV_PER_TILE strips of BLOCK_N keys,
    # one per kv head, and a row only scores the strip of its own kv head (a block-diagonal mask; all-true with one
    # kv head per tile, as on CUDA). Padding rows borrow the last kv head so that no row is masked out entirely.
    rows = tl.arange(0, BLOCK_H).to(IDX)
    row_kv = tl.minimum(rows // GROUP, KV_PER_TILE - 1)
    cols = tl.arange(0, KV_PER_TILE * BLOCK_N).to(IDX)
    col_kv = cols // BLOCK_N
    col_keys = cols % BLOCK_N
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    last_kv = tl.cast(num_kv_heads, IDX) - 1
    if ALL_KV_HEADS:
        head = rows
        row_mask = rows < tl.cast(num_kv_heads, IDX) * GROUP
        same_kv = tl.minimum(row_kv, last_kv)[:, None] == col_kv[None, :]
        cache_heads = col_kv
        head_mask = col_kv < num_kv_heads
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        tile_id = tl.cast(tile, IDX)
        split = tile_id % active_splits
        head_tile = tile_id // active_splits
        if ALL_KV_HEADS:
            req = head_tile
        else:
            first_kv = (head_tile % kv_tiles) * KV_PER_TILE
            req = head_tile // kv_tiles
        seq_len = tl.load(seq_lens_ptr + req)
        kv_start = split * partition_size
        kv_end = tl.minimum(seq_len, kv_start + partition_size)
        if not ALL_KV_HEADS:
            head = first_kv * GROUP + rows
            row_mask = (rows < KV_PER_TILE * GROUP) & (head // GROUP <= last_kv)
        if EVEN_D:
            io_mask = row_mask[:, None]
        else:
            io_mask = row_mask[:, None] & dim_mask[None, :]
        if not ALL_KV_HEADS:
            same_kv = tl.minimum(first_kv + row_kv, last_kv)[:, None] == (first_kv + col_kv)[None, :]
            cache_heads = first_kv + col_kv
            head_mask = cache_heads < num_kv_heads
        q = tl.load(q_ptr + req * stride_qb + head[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_H], 0.0, tl.float32)
        acc = tl.full([BLOCK_H, HEAD_DIM_PAD], 0.0, tl.float32)
        block_table = block_tables_ptr + req * stride_bt
        # A split past seq_len runs no step and leaves l_i = 0: it stores zeros and lse = -inf for the merge to drop.
        # Otherwise key kv_start is unmasked, so the running max is finite after the first step.
        for n_start in tl.range(kv_start, kv_end, BLOCK_N):
            keys = n_start + col_keys
            key_mask = (keys < kv_end) & head_mask
            # Padding entries of the block table lie past seq_len and are never loaded.
            block = tl.load(block_table + keys // BLOCK_SIZE, mask=key_mask, other=0).to(IDX)
            offset = keys % BLOCK_SIZE
            if KV_ROWS:
                kv_offs = (block * stride_kb + offset * stride_kt + cache_heads * stride_kh)[:, None] + dims[None, :]
                if EVEN_D:
                    kv_mask = key_mask[:, None]
                else:
                    kv_mask = key_mask[:, None] & dim_mask[None, :]
                k = tl.trans(tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0))  # [D_PAD, COLS]
            else:
                k = tl.load(k_cache_ptr + (block * stride_kb + offset * stride_kt + cache_heads * stride_kh)[None, :]
                            + dims[:, None], mask=key_mask[None, :] & dim_mask[:, None], other=0.0)  # [D_PAD, COLS]
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(key_mask[None, :] & same_kv, s, float("-inf"))
            if ONE_STEP:
                m_i = tl.reduce(s, 1, _MAX)
                p = tl.exp2(s - m_i[:, None])
                l_i = tl.reduce(p, 1, _SUM)
            else:
                m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
                p = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
            if KV_ROWS:
                v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [COLS, D_PAD]
            else:
                v = tl.load(v_cache_ptr + (block * stride_vb + offset * stride_vt + cache_heads * stride_vh)[:, None]
                            + dims[None, :], mask=key_mask[:, None] & dim_mask[None, :], other=0.0)  # [COLS, D_PAD]
            if ONE_STEP:
                acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m_i = m_new
        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        if SINGLE_SPLIT:
            # Merging one split only multiplies by exp2(0) = 1: storing here is bitwise the same and skips a launch.
            tl.store(out_ptr + req * stride_ob + head[:, None] * stride_oh + dims[None, :],
                     (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)
        else:
            lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(partial_out_ptr + req * stride_pb + head[:, None] * stride_ph + split * stride_ps
                     + dims[None, :], acc / l_safe[:, None], mask=io_mask)
            tl.store(partial_lse_ptr + req * stride_lb + head * stride_lh + split, lse, mask=row_mask)


@triton.jit
def _decode_merge_kernel(
    partial_out_ptr,  # [B, Hq, num_splits, D] float32
    partial_lse_ptr,  # [B, Hq, num_splits] float32
    out_ptr,  # [B, Hq, D]
    seq_lens_ptr,  # [B]
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    partition_size, num_heads, head_blocks, num_tiles, NUM_PROGRAMS,
    BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    IDX: tl.constexpr = tl.int64 if WIDE_INDEX else tl.int32
    pid = tl.program_id(0)
    dims = tl.arange(0, HEAD_DIM_PAD)
    block_heads = tl.arange(0, BLOCK_HEADS).to(IDX)
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        tile_id = tl.cast(tile, IDX)
        req = tile_id // head_blocks
        heads = (tile_id % head_blocks) * BLOCK_HEADS + block_heads
        head_mask = heads < num_heads
        io_mask = head_mask[:, None] & (dims < HEAD_DIM)[None, :]
        # The request's own splits, merged in order: the sum never sees the empty splits of longer requests.
        splits = (tl.load(seq_lens_ptr + req).to(IDX) + partition_size - 1) // partition_size
        lse_ptrs = partial_lse_ptr + req * stride_lb + heads * stride_lh
        out_ptrs = partial_out_ptr + req * stride_pb + heads[:, None] * stride_ph + dims[None, :]
        lse_max = tl.full([BLOCK_HEADS], float("-inf"), tl.float32)
        for s in range(0, splits):
            lse_max = tl.maximum(lse_max, tl.load(lse_ptrs + s, mask=head_mask, other=0.0))
        total = tl.full([BLOCK_HEADS], 0.0, tl.float32)
        acc = tl.full([BLOCK_HEADS, HEAD_DIM_PAD], 0.0, tl.float32)
        for s in range(0, splits):
            weight = tl.exp2(tl.load(lse_ptrs + s, mask=head_mask, other=0.0) - lse_max)
            total += weight
            acc += weight[:, None] * tl.load(out_ptrs + s * stride_ps, mask=io_mask, other=0.0)
        # seq_len 0 (graph padding) has no split: zeros.
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_ptr + req * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


def decode_num_splits(max_blocks: int, block_size: int) -> int:
    """Splits of the workspace: enough for a context filling the block tables (fewer run when contexts are shorter)."""
    return triton.cdiv(max(1, max_blocks * block_size), tile_table.decode_tiles().partition_size)


def decode_workspace(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocates the float32 (partial_out [B, Hq, num_splits, D], partial_lse [B, Hq, num_splits]) buffers that
    decode_attention needs; pass them back as `workspace` to keep allocations static (e.g. under CUDA graphs)."""
    num_seqs, num_heads, head_dim = q.shape
    splits = decode_num_splits(block_tables.shape[1], k_cache.shape[1])
    return (torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device),
            torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device))


def _check_inputs(q, k_cache, v_cache, seq_lens, block_tables, out, num_sms) -> None:
    check_paged_attention_inputs(q, k_cache, v_cache, seq_lens, block_tables, out, num_sms, num_seqs=q.shape[0])


def _check_workspace(workspace, q, num_splits) -> None:
    if not isinstance(workspace, tuple) or len(workspace) != 2:
        raise ValueError("workspace must be a (partial_out, partial_lse) tuple from decode_workspace")
    num_seqs, num_heads, head_dim = q.shape
    check_tensor("workspace[0]", workspace[0], dtypes=(torch.float32,), device=q.device, contiguous=True,
                 shape=(num_seqs, num_heads, num_splits, head_dim))
    check_tensor("workspace[1]", workspace[1], dtypes=(torch.float32,), device=q.device, contiguous=True,
                 shape=(num_seqs, num_heads, num_splits))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, *, scale: float, num_sms: int | None = None,
                     out: torch.Tensor | None = None,
                     workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of one query per request q [B, Hq, D] over keys 0..seq_lens[b]-1 of its paged K/V; returns
    out [B, Hq, D]. Requests with seq_lens[b] == 0 (CUDA-graph padding) get zeros."""
    _check_inputs(q, k_cache, v_cache, seq_lens, block_tables, out, num_sms)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    tiles = tile_table.decode_tiles()
    num_splits = decode_num_splits(block_tables.shape[1], block_size)
    if workspace is None:
        workspace = decode_workspace(q, k_cache, block_tables)
    _check_workspace(workspace, q, num_splits)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    partial_out, partial_lse = workspace
    group = num_heads // num_kv_heads
    kv_per_tile = tile_table.kv_heads_per_tile(num_kv_heads)
    head_dim_pad = max(16, next_power_of_2(head_dim))
    kv_tiles = triton.cdiv(num_kv_heads, kv_per_tile)
    host_splits, one_step = INTERPRET_PATHS, False
    if host_splits:
        # seq_lens lies in host memory: run only the splits that hold keys of the batch's longest context.
        longest = int(seq_lens.max())
        num_splits = min(num_splits, max(1, triton.cdiv(longest, tiles.partition_size)))
        one_step = min(longest, tiles.partition_size) <= tiles.block_n
    grid = num_programs(num_seqs * kv_tiles * num_splits, num_sms, q.device)
    # With one split the merge would multiply by exp2(0) = 1 and divide by 1: storing directly is bitwise the same.
    single_split = num_splits == 1
    wide = index_dtype_is_wide(q, k_cache, v_cache, partial_out, block_tables)
    _decode_split_kernel[(grid,)](
        q, k_cache, v_cache, partial_out, partial_lse, out, seq_lens, block_tables,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        scale * LOG2E, tiles.partition_size,
        num_seqs, num_kv_heads, kv_tiles, num_splits, grid,
        GROUP=group, KV_PER_TILE=kv_per_tile, BLOCK_H=max(16, next_power_of_2(kv_per_tile * group)),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_N=tiles.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SEQS_PAD=next_power_of_2(num_seqs),
        SINGLE_SPLIT=single_split, WIDE_INDEX=wide, HOST_SPLITS=host_splits,
        ALL_KV_HEADS=INTERPRET_PATHS and kv_tiles == 1,
        KV_ROWS=INTERPRET_PATHS and k_cache.stride() == v_cache.stride(),
        EVEN_D=INTERPRET_PATHS and head_dim == head_dim_pad, ONE_STEP=one_step,
        num_warps=tiles.num_warps if INTERPRET else tile_table.cuda_decode_num_warps(head_dim_pad),
    )
    if single_split:
        return out
    # The interpreter pays per tile and per op, so it merges all heads of a request at once.
    merge_heads = next_power_of_2(num_heads) if INTERPRET else 1
    head_blocks = triton.cdiv(num_heads, merge_heads)
    merge_tiles = num_seqs * head_blocks
    merge_grid = num_programs(merge_tiles, num_sms, q.device)
    _decode_merge_kernel[(merge_grid,)](
        partial_out, partial_lse, out, seq_lens,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        out.stride(0), out.stride(1),
        tiles.partition_size, num_heads, head_blocks, merge_tiles, merge_grid,
        BLOCK_HEADS=merge_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, WIDE_INDEX=wide,
        num_warps=4,
    )
    return out
