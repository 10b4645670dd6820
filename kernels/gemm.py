"""Persistent GEMM `x @ w.T (+ bias)` in the checkpoint's [N, K] weight layout; every linear layer of the model
(projections, MLP, lm_head) runs through it."""
import torch
import triton
import triton.language as tl

from minidu.kernels import tiles
from minidu.kernels.activation import silu_and_mul
from minidu.kernels.tiles import GemmConfig
from minidu.kernels.utils import FLOAT_DTYPES, INTERPRET, check_tensor, num_programs, resolve_num_sms

@triton.jit(do_not_specialize=["num_pid_m", "num_pid_n", "num_k_tiles", "num_progs"])
def _gemm_kernel(
    x_ptr,  # [M, K] (or [M, 2K] = [gate | up] if SILU_MUL), row stride stride_xm
    w_ptr,  # [N, K] (or [N, K // W_PACK] uint64 words), row stride stride_wn in its own elements
    bias_ptr,  # [N]; a dummy pointer when not HAS_BIAS
    out_ptr,  # [M, N], row stride stride_om
    M, N, K,
    stride_xm, stride_wn, stride_om,
    num_pid_m, num_pid_n, num_k_tiles, num_progs,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
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
            if SILU_MUL:
                # SwiGLU as the prologue of the down projection: silu(gate) * up rounded to x's dtype, the value
                # silu_and_mul would store, so the fused product equals the unfused one bitwise.
                if EVEN_K:
                    up = tl.load(x_ptrs + K)
                else:
                    up = tl.load(x_ptrs + K, mask=offs_k[None, :] < k_left, other=0.0)
                gate = a.to(tl.float32)
                e = tl.exp(-tl.abs(gate))
                sigmoid = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
                a = (gate * sigmoid * up.to(tl.float32)).to(x_ptr.dtype.element_ty)
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


def _num_tiles(m: int, n: int, block_m: int, block_n: int) -> int:
    return triton.cdiv(m, block_m) * triton.cdiv(n, block_n)


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    """Tile configuration from the shape, dtype and GPU only, so results never depend on the SM budget (nor, on
    CUDA, on M: see tiles.cuda_gemm_config)."""
    if INTERPRET:
        return tiles.interpret_gemm_config(m, n, k)
    major, minor = torch.cuda.get_device_capability(device)
    return tiles.cuda_gemm_config(n, k, dtype.itemsize, tiles.cuda_target(10 * major + minor))


def _weight_pack(w: torch.Tensor) -> int:
    pack = 8 // w.element_size()
    aligned = (w.shape[1] % pack == 0 and w.stride(0) % pack == 0 and w.storage_offset() % pack == 0
               and w.stride(1) == 1 and w.data_ptr() % 8 == 0)
    return tiles.weight_pack(w.element_size(), aligned)


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def _check_inputs(x, w, bias, out, silu_mul: bool) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if silu_mul and x.shape[1] % 2:
        raise ValueError(f"x must have an even last dimension [gate | up], got shape {tuple(x.shape)}")
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    check_tensor("w", w, ndim=2, dtypes=(x.dtype,), device=x.device, shape=(None, k))
    _check_last_dim_contiguous("x", x)
    _check_last_dim_contiguous("w", w)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device, shape=(w.shape[0],), contiguous=True)
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(x.dtype,), device=x.device, shape=(x.shape[0], w.shape[0]))
        _check_last_dim_contiguous("out", out)


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
         num_sms: int | None = None, out: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    """out[M, N] = x[M, K] @ w[N, K].T (+ bias[N]), fp32 accumulation, in x's dtype, on at most `num_sms` SMs.

    With `silu_mul`, x is [M, 2K] = [gate | up] and the product is taken of silu_and_mul(x): in the interpreter computed
    per tile and never stored (one launch, bitwise equal to the two kernels in sequence), on CUDA by silu_and_mul
    first (see tiles.SILU_MUL_PROLOGUE).
    """
    _check_inputs(x, w, bias, out, silu_mul)
    resolve_num_sms(num_sms, x.device)
    if silu_mul and not tiles.SILU_MUL_PROLOGUE:
        x, silu_mul = silu_and_mul(x, num_sms=num_sms), False
    m, k, n = x.shape[0], w.shape[1], w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = gemm_config(m, n, k, x.dtype, x.device)
    grid = num_programs(_num_tiles(m, n, cfg.block_m, cfg.block_n), num_sms, x.device)
    pack = _weight_pack(w)
    w_arg = w if pack == 1 else w.view(torch.uint64)
    _gemm_kernel[(grid,)](
        x, w_arg, bias if bias is not None else out, out,
        m, n, k,
        x.stride(0), w_arg.stride(0), out.stride(0),
        triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k), grid,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        EVEN_K=k % cfg.block_k == 0,
        W_PACK=pack,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
