"""RMSNorm with an optional fused residual add: the decoder pre-norms, the final norm and Qwen3's per-head q/k norm."""
import torch
import triton
import triton.language as tl

from minidu.kernels import tiles
from minidu.kernels.utils import FLOAT_DTYPES, INTERPRET, check_tensor, next_power_of_2, num_programs



@triton.jit(do_not_specialize=["num_rows", "num_tiles", "NUM_PROGRAMS"])
def _rms_norm_kernel(
    x_ptr,  # [T, heads, H], strides (stride_xt, stride_xh, 1)
    residual_ptr,  # [T, heads, H], strides (stride_rt, stride_rh, 1); unused unless HAS_RESIDUAL
    weight_ptr,  # [H]
    out_ptr,  # [T, heads, H], strides (stride_ot, stride_oh, 1)
    num_rows, num_heads, hidden, eps,
    stride_xt, stride_xh, stride_rt, stride_rh, stride_ot, stride_oh,
    num_tiles, NUM_PROGRAMS,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # int64 row indices: see the interpreter notes in kernels/utils.py.
    tile_rows = tl.arange(0, BLOCK_R).to(tl.int64)
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        rows = tile * BLOCK_R + tile_rows
        # A row is one (token, head) pair, so [T, heads, D] views of a fused qkv buffer need no copy.
        tokens = rows // num_heads
        heads = rows % num_heads
        mask = (rows < num_rows)[:, None] & col_mask[None, :]
        x_ptrs = x_ptr + (tokens * stride_xt + heads * stride_xh)[:, None] + cols[None, :]
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r_ptrs = residual_ptr + (tokens * stride_rt + heads * stride_rh)[:, None] + cols[None, :]
            summed = (x + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)).to(residual_ptr.dtype.element_ty)
            tl.store(r_ptrs, summed, mask=mask)
            # Normalise the stored (rounded) sum, as the unfused model would.
            x = summed.to(tl.float32)
        variance = tl.sum(x * x, axis=1) / hidden
        normed = x * tl.rsqrt(variance + eps)[:, None]
        # HF order: round the normalised row to the activation dtype before scaling by the weight.
        y = normed.to(out_ptr.dtype.element_ty).to(tl.float32) * weight[None, :]
        out_ptrs = out_ptr + (tokens * stride_ot + heads * stride_oh)[:, None] + cols[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(name: str, t, x: torch.Tensor) -> None:
    check_tensor(name, t, ndim=x.dim(), dtypes=(x.dtype,), device=x.device, shape=tuple(x.shape))
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), 0)


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             num_sms: int | None = None, out: torch.Tensor | None = None):
    """RMSNorm over the last dimension of x [T, H] (or [T, heads, H] for per-head q/k norm).

    Computes weight * (x_f32 * rsqrt(mean(x_f32 ** 2) + eps)).to(x.dtype) in fp32 and stores it in x.dtype, the order
    Hugging Face Llama uses (normalise in fp32, cast to the input dtype, then multiply by the weight).
    Rows of x, residual and out may have any strides except the last dimension, which must be contiguous.
    With `residual`: residual <- x + residual in place (rounded to its dtype), the norm is taken of that sum, and
    (out, residual) is returned; otherwise out is returned.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have 2 or 3 dimensions, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must be contiguous in its last dimension, got strides {x.stride()}")
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError("x must have a non-empty last dimension")
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device, shape=(hidden,), contiguous=True)
    check_eps(eps)
    if residual is not None:
        _check_rows("residual", residual, x)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        _check_rows("out", out, x)

    num_heads = x.shape[1] if x.dim() == 3 else 1
    num_rows = x.shape[0] * num_heads
    block_h = next_power_of_2(hidden)
    block_r = max(1, tiles.TILE_ELEMS // block_h)
    if INTERPRET:
        # Interpreted lanes cost time even when masked; on CUDA the tile depends on H alone, which keeps every
        # row's reduction order the same whatever the batch.
        block_r = min(block_r, next_power_of_2(max(num_rows, 1)))
    num_tiles = triton.cdiv(num_rows, block_r)
    grid = num_programs(num_tiles, num_sms, x.device)
    res = residual if residual is not None else x
    _rms_norm_kernel[(grid,)](
        x, res, weight, out, num_rows, num_heads, hidden, float(eps),
        *_row_strides(x), *_row_strides(res), *_row_strides(out), num_tiles, grid,
        HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_H=block_h,
        num_warps=min(16, max(4, block_r * block_h // 1024)),
    )
    return out if residual is None else (out, residual)
