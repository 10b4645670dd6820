"""Row gather, out[t] = table[ids[t]]: the token-embedding lookup (also of one rank's vocabulary shard under tensor
parallelism, where ids outside the shard give zero rows), and the pick of each sampling row's hidden state before the
LM head."""
import torch
import triton
import triton.language as tl

from minidu.kernels import tiles
from minidu.kernels.utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, num_programs, output_2d, row_tiles


@triton.jit(do_not_specialize=["num_tokens", "col_tiles", "num_tiles", "NUM_PROGRAMS"])
def _gather_rows_kernel(
    ids_ptr,  # [T]
    table_ptr,  # [V, H], strides (stride_wv, 1)
    out_ptr,  # [T, H], strides (stride_ot, 1)
    num_tokens, hidden, stride_wv, stride_ot,
    row_start, num_rows,  # SHARD: the table holds rows [row_start, row_start + num_rows) of the whole one
    col_tiles, num_tiles, NUM_PROGRAMS,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, SHARD: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 indices: see the interpreter notes in kernels/utils.py.
    tile_rows = tl.arange(0, BLOCK_T).to(tl.int64)
    tile_cols = tl.arange(0, BLOCK_H).to(tl.int64)
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        tile_id = tl.cast(tile, tl.int64)
        rows = (tile_id // col_tiles) * BLOCK_T + tile_rows
        cols = (tile_id % col_tiles) * BLOCK_H + tile_cols
        row_mask = rows < num_tokens
        mask = row_mask[:, None] & (cols < hidden)[None, :]
        ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        load_mask = mask
        if SHARD:
            ids -= row_start
            load_mask = mask & ((ids >= 0) & (ids < num_rows))[:, None]
        vals = tl.load(table_ptr + (ids * stride_wv)[:, None] + cols[None, :], mask=load_mask, other=0.0)
        tl.store(out_ptr + (rows * stride_ot)[:, None] + cols[None, :], vals, mask=mask)


def gather_rows(ids: torch.Tensor, table: torch.Tensor, *, row_start: int | None = None,
                num_sms: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """ids [T] int, table [V, H] -> out [T, H] with out[t] = table[ids[t]].

    Ids must lie in [0, V): they are not checked here because that would need a device sync (the engine validates
    prompts). With `row_start`, table holds rows [row_start, row_start + V) of a larger one (a vocabulary shard):
    out[t] = table[ids[t] - row_start] for ids inside it and zeros for any other id. Rows of table and out may be
    strided; their last dimension must be contiguous.
    """
    check_tensor("table", table, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("ids", ids, ndim=1, dtypes=INDEX_DTYPES, device=table.device, contiguous=True)
    if table.stride(1) != 1:
        raise ValueError(f"table must be contiguous in its last dimension, got strides {table.stride()}")
    if row_start is not None and (not isinstance(row_start, int) or isinstance(row_start, bool) or row_start < 0):
        raise ValueError(f"row_start must be None or an int >= 0, got {row_start!r}")
    num_tokens, hidden = ids.shape[0], table.shape[1]
    out = output_2d(out, (num_tokens, hidden), table.dtype, table.device)
    if hidden == 0:
        return out

    block_t, block_h, col_tiles, num_tiles = row_tiles(num_tokens, hidden, tiles.TILE_COLS, tiles.TILE_ELEMS)
    grid = num_programs(num_tiles, num_sms, table.device)
    _gather_rows_kernel[(grid,)](
        ids, table, out, num_tokens, hidden, table.stride(0), out.stride(0), row_start or 0, table.shape[0],
        col_tiles, num_tiles, grid, BLOCK_T=block_t, BLOCK_H=block_h, SHARD=row_start is not None, num_warps=4,
    )
    return out
