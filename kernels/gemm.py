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


@triton.jit(do_not_specialize=["num_pid_m", "num_pid_n", "num_k_tiles", "num_progs"])
def _gemm_kernel(
    x_ptr,  # [M, K], row stride stride_xm
    w_ptr,  # [N, K] (or [N, K // W_PACK] uint64 words), row stride stride_wn in its own elements
    bias_ptr,  # [N]; a dummy pointer when not HAS_BIAS
    out_ptr,  # [M, N], row stride stride_om
    M, N, K,
    stride_xm, stride_wn, stride_om,
    num_pid_m, num_pid_n, num_k_tiles, num_progs,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    W_PACK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # int64 tile index math and a host-computed tile grid: see the interpreter notes in kernels/utils.py.
    tiles_per_group = tl.cast(num_pid_n, tl.int64) * GROUP_M
    num_tiles = tl.cast(num_pid_m, tl.int64) * num_pid_n
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_K // W_PACK)
    if W_PACK > 1 and not EVEN_K:
        # Word column of each element of a flattened [BLOCK_N, BLOCK_K // W_PACK] block of packed weights.
        word_cols = tl.arange(0, BLOCK_N * (BLOCK_K // W_PACK)) % (BLOCK_K // W_PACK)
    for tile in tl.range(tl.program_id(0), num_tiles, num_progs):
        # GROUP_M row-tiles sweep the N tiles together, so their w columns are reused from L2.
        tile_id = tl.cast(tile, tl.int64)
        first_m = (tile_id // tiles_per_group) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile_id % tiles_per_group) % group_m
        pid_n = (tile_id % tiles_per_group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past M (or N) wrap onto valid rows so the K loop loads without M/N masks; the store drops them.
        # int64 row offsets: M * stride can pass 2**31 for long prompts times wide outputs.
        x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        if W_PACK == 1:
            w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        else:
            # Packed weights load as BLOCK_N rows of BLOCK_K // W_PACK words, flattened: the interpreter gathers
            # 1-D blocks about 1.5x faster per element than 2-D ones.
            w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn + offs_kw[None, :]
            w_ptrs = w_ptrs.reshape(BLOCK_N * (BLOCK_K // W_PACK))
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k in range(0, num_k_tiles):
            if EVEN_K:
                a = tl.load(x_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            if W_PACK == 1:
                if EVEN_K:
                    b = tl.load(w_ptrs)
                else:
                    b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            else:
                if EVEN_K:
                    words = tl.load(w_ptrs)
                else:
                    words = tl.load(w_ptrs, mask=word_cols < k_left // W_PACK, other=0)
                # Word j of a row holds elements W_PACK*j, W_PACK*j + 1, ... from its lowest bits up (little-endian):
                # split into 32-bit halves, then (16-bit types) 16-bit quarters, interleaving them back in order.
                # Unsigned words: the interpreter's logical shift is one numpy op, its arithmetic shift three.
                bits = tl.join(words.to(tl.uint32), (words >> 32).to(tl.uint32))
                if W_PACK == 4:
                    bits = tl.join(bits.to(tl.uint16), (bits >> 16).to(tl.uint16))
                b = tl.trans(bits.reshape(BLOCK_N, BLOCK_K).to(x_ptr.dtype.element_ty, bitcast=True))
            # ieee keeps fp32 exact (no tf32 rounding); half-precision inputs use tensor cores regardless.
            acc = tl.dot(a, b, acc, input_precision="ieee")
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // W_PACK
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(max(n, 1))))


def _num_tiles(m: int, n: int, block_m: int, block_n: int) -> int:
    return triton.cdiv(m, block_m) * triton.cdiv(n, block_n)


# Interpreter cost model (seconds, fitted on a 2-core AMD EPYC host): every tile and every K step pays for its ops
# in Python; every loaded weight element (wrapped rows and masked columns included) for its word-packed gather,
# unpacking and dot in numpy, about twice as much when K needs masks (every step then builds and applies them).
_TILE_COST, _STEP_COST, _ELEM_COST, _MASKED_ELEM_COST, _MAC_COST = 5e-4, 4e-4, 6e-9, 1.1e-8, 2e-11
# Bigger tiles cost more per element: their numpy temporaries spill out of the caches.
_MAX_TILE_ELEMS = 2 ** 19


def _interpret_cost(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int) -> float:
    tiles = _num_tiles(m, n, block_m, block_n)
    steps = triton.cdiv(k, block_k)
    elem_cost = _ELEM_COST if k % block_k == 0 else _MASKED_ELEM_COST
    return tiles * (_TILE_COST + steps * (_STEP_COST + block_n * block_k * (elem_cost + block_m * _MAC_COST)))


def _interpret_config(m: int, n: int, k: int) -> GemmConfig:
    # The interpreter pays per program instance and per op, not per FLOP: all rows of a short batch share one tile
    # row (so the weight is read once), and (BLOCK_N, BLOCK_K) minimise the cost model above.
    block_m = _clamp_pow2(m, 1, 64)
    candidates = [(bn, bk) for bn in (2 ** i for i in range(4, 15)) for bk in (2 ** i for i in range(4, 11))
                  if bn * bk <= _MAX_TILE_ELEMS and bn <= max(16, next_power_of_2(n))
                  and bk <= max(16, next_power_of_2(k))]
    block_n, block_k = min(candidates, key=lambda c: _interpret_cost(m, n, k, block_m, *c))
    return GemmConfig(block_m, block_n, block_k)


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


def _weight_pack(w: torch.Tensor) -> int:
    """Weight elements per 64-bit load: 8 // itemsize in the interpreter when w's rows are whole aligned words, else 1.

    The interpreter gathers every loaded element separately, so loading the weight (all of it, once per batch) as
    uint64 words and unpacking them with shifts makes its GEMMs about 1.7x faster. Compiled kernels load plain
    elements: their vectorised loads already move whole words.
    """
    pack = 8 // w.element_size()
    k = w.shape[1]
    aligned = (k % pack == 0 and w.stride(0) % pack == 0 and w.storage_offset() % pack == 0
               and w.stride(1) == 1 and w.data_ptr() % 8 == 0)
    return pack if INTERPRET and pack > 1 and aligned else 1


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
    pack = _weight_pack(w)
    w_arg = w if pack == 1 else w.view(torch.uint64)
    _gemm_kernel[(grid,)](
        x, w_arg, bias if bias is not None else out, out,
        m, n, k,
        x.stride(0), w_arg.stride(0), out.stride(0),
        triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k), grid,
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0,
        W_PACK=pack,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
