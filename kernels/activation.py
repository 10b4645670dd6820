"""SwiGLU activation for the MLP: silu(gate) * up on the fused [gate | up] GEMM output."""
import torch
import triton
import triton.language as tl

from minidu.kernels import tiles
from minidu.kernels.utils import FLOAT_DTYPES, check_tensor, num_programs, output_2d, row_tiles



@triton.jit(do_not_specialize=["num_tokens", "col_tiles", "num_tiles", "NUM_PROGRAMS"])
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2I], strides (stride_xt, 1)
    out_ptr,  # [T, I], strides (stride_ot, 1)
    num_tokens, inter, stride_xt, stride_ot,
    col_tiles, num_tiles, NUM_PROGRAMS,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 indices: see the interpreter notes in kernels/utils.py.
    tile_rows = tl.arange(0, BLOCK_T).to(tl.int64)
    tile_cols = tl.arange(0, BLOCK_I).to(tl.int64)
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        tile_id = tl.cast(tile, tl.int64)
        rows = (tile_id // col_tiles) * BLOCK_T + tile_rows
        cols = (tile_id % col_tiles) * BLOCK_I + tile_cols
        mask = (rows < num_tokens)[:, None] & (cols < inter)[None, :]
        gate_ptrs = x_ptr + (rows * stride_xt)[:, None] + cols[None, :]
        gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        # sigmoid from exp(-|gate|) so no intermediate overflows to inf for large |gate|.
        e = tl.exp(-tl.abs(gate))
        sigmoid = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        y = gate * sigmoid * up
        tl.store(out_ptr + (rows * stride_ot)[:, None] + cols[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, num_sms: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> silu(gate) * up [T, I], computed in fp32 and stored in x.dtype.

    Rows of x and out may be strided; their last dimension must be contiguous.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] % 2:
        raise ValueError(f"x must have an even last dimension [gate | up], got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dimension, got strides {x.stride()}")
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = output_2d(out, (num_tokens, inter), x.dtype, x.device)
    if inter == 0:
        return out

    block_t, block_i, col_tiles, num_tiles = row_tiles(num_tokens, inter, tiles.TILE_COLS, tiles.TILE_ELEMS)
    grid = num_programs(num_tiles, num_sms, x.device)
    _silu_and_mul_kernel[(grid,)](
        x, out, num_tokens, inter, x.stride(0), out.stride(0), col_tiles, num_tiles, grid,
        BLOCK_T=block_t, BLOCK_I=block_i, num_warps=4,
    )
    return out
