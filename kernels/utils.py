"""Shared launcher helpers: SM budgets, grid sizing and input validation for every kernel family."""
import functools

import torch
import minidu.kernels.platform  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import triton

from minidu.kernels.platform import INTERPRET

# The interpreter runs programs one after another, so every extra program only repeats its prologue: one program
# per launch (results are bitwise the same for any budget).
CPU_NUM_SMS = 1

# Interpreter notes, which shape every kernel's code (none of this changes what a compiled kernel computes):
# - each tl op costs ~25 us of Python whatever its size, and every loaded or stored element ~5-10 ns of numpy;
# - a call to a @triton.jit helper, tl.cdiv and tl.zeros included, re-patches triton.language first (~0.3 ms), so
#   kernels inline such helpers and write (a + b - 1) // b and tl.full;
# - every int32 (or narrower) add, sub and mul is checked for overflow with ~7 more ops, int64 ones are not, so
#   index math runs in int64 (int64 aranges, tl.cast of loop indices) and tile counts come from the host.


def index_dtype_is_wide(*tensors: torch.Tensor) -> bool:
    """A kernel's WIDE_INDEX: int64 index math in the interpreter (see the notes above), or where an offset into one of
    `tensors` may reach 2**31 (every unmasked lane's offset is below its tensor's element count); compiled kernels
    otherwise index in int32, which needs fewer registers (with int64 the attention kernels spilled)."""
    return INTERPRET or any(t.numel() >= 2**31 for t in tensors)


@functools.cache
def device_num_sms(device_index: int = 0) -> int:
    """Number of SMs of a CUDA device (or CPU_NUM_SMS where kernels are interpreted)."""
    if INTERPRET or not torch.cuda.is_available():
        return CPU_NUM_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def resolve_num_sms(num_sms: int | None, device: torch.device) -> int:
    """The budget to use: `num_sms`, or every SM of `device` when None."""
    if num_sms is None:
        index = device.index if device.type == "cuda" and device.index is not None else 0
        return device_num_sms(index)
    if isinstance(num_sms, bool) or not isinstance(num_sms, int):
        raise ValueError(f"num_sms must be an int or None, got {num_sms!r}")
    if num_sms < 1:
        raise ValueError(f"num_sms must be >= 1, got {num_sms}")
    return num_sms


def num_programs(num_tiles: int, num_sms: int | None, device: torch.device) -> int:
    """Persistent grid size: min(budget, tiles), at least 1 so empty launches stay valid."""
    return max(1, min(resolve_num_sms(num_sms, device), num_tiles))


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None,
                 contiguous: bool = False, shape: tuple | None = None) -> None:
    """Raises ValueError naming `name` when `t` is not a tensor of the expected rank, dtype, device or shape.

    `shape` entries of None are not checked.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


next_power_of_2 = triton.next_power_of_2


def output_2d(out, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`out` checked against [rows, cols] (rows may be strided, the last dimension contiguous), or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor("out", out, ndim=2, dtypes=(dtype,), device=device, shape=shape)
    if out.stride(1) != 1:
        raise ValueError(f"out must be contiguous in its last dimension, got strides {out.stride()}")
    return out


def row_tiles(num_rows: int, num_cols: int, tile_cols: int, tile_elems: int) -> tuple[int, int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, column tiles, tiles) of a row-wise kernel: up to `tile_cols` columns and `tile_elems`
    elements a tile."""
    block_cols = min(next_power_of_2(num_cols), tile_cols)
    block_rows = max(1, min(next_power_of_2(max(num_rows, 1)), tile_elems // block_cols))
    col_tiles = triton.cdiv(num_cols, block_cols)
    return block_rows, block_cols, col_tiles, triton.cdiv(num_rows, block_rows) * col_tiles
