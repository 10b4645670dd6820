"""Persistent GEMM `x @ w.T (+ bias)` in the checkpoint's [N, K] weight layout; every linear layer of the model
(projections, MLP, lm_head) runs through it."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minidu.kernels.utils import FLOAT_DTYPES, INTERPRET, check_tensor, next_power_of_2, num_programs, resolve_num_sms

# Decode tiles are chosen so a 4096-wide projection still yields about one tile per SM of an H100/H200.
_TARGET_TILES = 128


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@triton.jit(do_not_specialize=["num_progs"])
def _gemm_kernel(
    x_ptr,  # [M, K], row stride stride_xm
    w_ptr,  # [N, K], row stride stride_wn
    bias_ptr,  # [N]; a dummy pointer when not HAS_BIAS
    out_ptr,  # [M, N], row stride stride_om
    M, N, K,
    stride_xm, stride_wn, stride_om,
    num_progs,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    tiles_per_group = GROUP_M * num_pid_n
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, num_progs):
        # GROUP_M row-tiles sweep the N tiles together, so their w columns are reused from L2.
        first_m = (tile // tiles_per_group) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_group) % group_m
        pid_n = (tile % tiles_per_group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past M (or N) wrap onto valid rows so the K loop loads without M/N masks; the store drops them.
        # int64 row offsets: M * stride can pass 2**31 for long prompts times wide outputs.
        x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            # ieee keeps fp32 exact (no tf32 rounding); half-precision inputs use tensor cores regardless.
            acc = tl.dot(a, b, acc, input_precision="ieee")
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(max(n, 1))))


def _num_tiles(m: int, n: int, block_m: int, block_n: int) -> int:
    return triton.cdiv(m, block_m) * triton.cdiv(n, block_n)


def _interpret_config(m: int, n: int, k: int) -> GemmConfig:
    # The interpreter pays per program instance and per op, not per FLOP: few, large tiles win, and a
    # BLOCK_K dividing K drops the mask arithmetic over the whole [BLOCK_K, BLOCK_N] weight tile.
    block_k = next((bk for bk in (128, 64, 32, 16) if k % bk == 0), _clamp_pow2(k, 16, 128))
    return GemmConfig(_clamp_pow2(m, 16, 64), _clamp_pow2(n, 16, 2048), block_k)


def _decode_config(m: int, n: int, k: int) -> GemmConfig:
    # Weight-bandwidth bound: narrow N tiles keep every SM streaming, deep K stages keep bytes in flight.
    block_m = _clamp_pow2(m, 16, 64)
    block_n = next((bn for bn in (128, 64) if _num_tiles(m, n, block_m, bn) >= _TARGET_TILES), 32)
    block_k = _clamp_pow2(k, 32, 256 if block_n <= 64 else 128)
    return GemmConfig(block_m, block_n, block_k, num_warps=4, num_stages=4)


def _prefill_config(m: int, n: int, k: int) -> GemmConfig:
    # Hopper wgmma sweet spot; fall back to 128x128 when 128x256 would leave SMs idle.
    if _num_tiles(m, n, 128, 256) >= _TARGET_TILES:
        return GemmConfig(128, 256, 64, num_warps=8, num_stages=3)
    return GemmConfig(128, 128, 64, num_warps=8, num_stages=4)


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype) -> GemmConfig:
    """Tile configuration, a function of shape and dtype only so results never depend on the SM budget."""
    if INTERPRET:
        return _interpret_config(m, n, k)
    if dtype == torch.float32:
        # ieee fp32 runs on CUDA cores: register-light tiles.
        return GemmConfig(_clamp_pow2(m, 16, 64), 64, 32, num_warps=4, num_stages=3)
    if m <= 64:
        return _decode_config(m, n, k)
    if m <= 256:
        return GemmConfig(64, 128, 64, num_warps=4, num_stages=4)
    return _prefill_config(m, n, k)


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def _check_inputs(x, w, bias, out) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("w", w, ndim=2, dtypes=(x.dtype,), device=x.device, shape=(None, x.shape[1]))
    _check_last_dim_contiguous("x", x)
    _check_last_dim_contiguous("w", w)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device, shape=(w.shape[0],), contiguous=True)
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(x.dtype,), device=x.device, shape=(x.shape[0], w.shape[0]))
        _check_last_dim_contiguous("out", out)


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
         num_sms: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[M, N] = x[M, K] @ w[N, K].T (+ bias[N]), fp32 accumulation, in x's dtype, on at most `num_sms` SMs."""
    _check_inputs(x, w, bias, out)
    resolve_num_sms(num_sms, x.device)
    (m, k), n = x.shape, w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = gemm_config(m, n, k, x.dtype)
    grid = num_programs(_num_tiles(m, n, cfg.block_m, cfg.block_n), num_sms, x.device)
    _gemm_kernel[(grid,)](
        x, w, bias if bias is not None else out, out,
        m, n, k,
        x.stride(0), w.stride(0), out.stride(0),
        grid,
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
