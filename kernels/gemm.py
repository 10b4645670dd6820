"""Persistent GEMM `x @ w.T (+ bias)` in the checkpoint's [N, K] weight layout; every linear layer of the model
(projections, MLP, lm_head) runs through it, optionally followed by the residual add and RMSNorm of the next layer."""
import torch
import triton
import triton.language as tl

from minidu.kernels import tiles
from minidu.kernels.activation import silu_and_mul
from minidu.kernels.rmsnorm import check_eps, rms_norm
from minidu.kernels.tiles import GemmConfig
from minidu.kernels.utils import FLOAT_DTYPES, INTERPRET, check_tensor, num_programs, resolve_num_sms

@triton.jit(do_not_specialize=["num_pid_m", "num_pid_n", "num_k_tiles", "num_progs"])
def _gemm_kernel(
    x_ptr,  # [M, K] (or [M, 2K] = [gate | up] if SILU_MUL), row stride stride_xm
    w_ptr,  # [N, K] (or [N, K // W_PACK] uint64 words), row stride stride_wn in its own elements
    bias_ptr,  # [N]; a dummy pointer when not HAS_BIAS
    out_ptr,  # [M, N], row stride stride_om; with HAS_RESIDUAL also the residual it adds (read, then overwritten)
    norm_weight_ptr,  # [N]; a dummy pointer when not NORM
    norm_out_ptr,  # [M, N], row stride stride_nm; a dummy pointer when not NORM
    M, N, K, eps,
    stride_xm, stride_wn, stride_om, stride_nm,
    num_pid_m, num_pid_n, num_k_tiles, num_progs,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
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
        y = acc.to(out_ptr.dtype.element_ty)
        if HAS_RESIDUAL:
            # The rounded product plus the residual, rounded again: what rms_norm(residual=) stores for it.
            y = (y.to(tl.float32) + tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)).to(y.dtype)
        tl.store(out_ptrs, y, mask=mask)
        if NORM:
            # The next RMSNorm over whole rows (the launcher makes BLOCK_N = next_power_of_2(N), one column tile),
            # in rms_norm's order and padding so the result is bitwise rms_norm's.
            yf = tl.where(offs_n[None, :] < N, y.to(tl.float32), 0.0)
            variance = tl.sum(yf * yf, axis=1) / N
            normed = (yf * tl.rsqrt(variance + eps)[:, None]).to(y.dtype).to(tl.float32)
            nw = tl.load(norm_weight_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            norm_ptrs = norm_out_ptr + offs_m.to(tl.int64)[:, None] * stride_nm + offs_n[None, :]
            tl.store(norm_ptrs, (normed * nw[None, :]).to(y.dtype), mask=mask)


def _num_tiles(m: int, n: int, block_m: int, block_n: int) -> int:
    return triton.cdiv(m, block_m) * triton.cdiv(n, block_n)


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
                norm: bool = False) -> GemmConfig:
    """Tile configuration from the shape, dtype and GPU only, so results never depend on the SM budget (nor, on
    CUDA, on M: see tiles.cuda_gemm_config). `norm`: whole-row tiles for the RMSNorm epilogue (interpreter)."""
    if INTERPRET:
        return tiles.interpret_gemm_config(m, n, k, whole_rows=norm)
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


def _check_epilogue(x, w, out, residual, norm_weight, eps) -> None:
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device, shape=(x.shape[0], w.shape[0]))
        _check_last_dim_contiguous("residual", residual)
        if norm_weight is None:
            raise ValueError("residual is only added together with the RMSNorm that follows it: pass norm_weight")
        if out is not None:
            raise ValueError("out must be None when residual is given: the sum is written to residual")
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device, shape=(w.shape[0],),
                     contiguous=True)
        check_eps(eps)


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
         num_sms: int | None = None, out: torch.Tensor | None = None, silu_mul: bool = False,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out[M, N] = x[M, K] @ w[N, K].T (+ bias[N]), fp32 accumulation, in x's dtype, on at most `num_sms` SMs.

    With `silu_mul`, x is [M, 2K] = [gate | up] and the product is taken of silu_and_mul(x): in the interpreter computed
    per tile and never stored (one launch, bitwise equal to the two kernels in sequence), on CUDA by silu_and_mul
    first (see tiles.SILU_MUL_PROLOGUE).

    With `norm_weight`, the decoder's next RMSNorm follows and (sum, rms_norm(sum, norm_weight, eps)) is returned, where
    sum is out, or with `residual` the residual updated in place to out + residual (the product rounded to x's dtype,
    then the sum, as rms_norm(..., residual=) rounds them). One launch where tiles.norm_epilogue allows it (the norm
    then bitwise rms_norm's of the stored sum), else gemm and rms_norm.
    """
    _check_inputs(x, w, bias, out, silu_mul)
    _check_epilogue(x, w, out, residual, norm_weight, eps)
    resolve_num_sms(num_sms, x.device)
    if norm_weight is not None and not tiles.norm_epilogue(w.shape[0]):
        y = gemm(x, w, bias, num_sms=num_sms, out=out, silu_mul=silu_mul)
        if residual is None:
            return y, rms_norm(y, norm_weight, eps, num_sms=num_sms)
        normed, residual = rms_norm(y, norm_weight, eps, residual=residual, num_sms=num_sms)
        return residual, normed
    if silu_mul and not tiles.SILU_MUL_PROLOGUE:
        x, silu_mul = silu_and_mul(x, num_sms=num_sms), False
    m, n = x.shape[0], w.shape[0]
    if residual is not None:
        out = residual
    elif out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    normed = None if norm_weight is None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m > 0 and n > 0:
        _launch(x, w, bias, out, normed, norm_weight, eps, silu_mul, residual is not None, num_sms)
    return out if normed is None else (out, normed)


def _launch(x, w, bias, out, normed, norm_weight, eps, silu_mul: bool, has_residual: bool, num_sms) -> None:
    m, k, n = x.shape[0], w.shape[1], w.shape[0]
    cfg = gemm_config(m, n, k, x.dtype, x.device, norm=normed is not None)
    grid = num_programs(_num_tiles(m, n, cfg.block_m, cfg.block_n), num_sms, x.device)
    pack = _weight_pack(w)
    w_arg = w if pack == 1 else w.view(torch.uint64)
    _gemm_kernel[(grid,)](
        x, w_arg, bias if bias is not None else out, out,
        norm_weight if normed is not None else out, normed if normed is not None else out,
        m, n, k, float(eps) if normed is not None else 0.0,
        x.stride(0), w_arg.stride(0), out.stride(0), normed.stride(0) if normed is not None else 0,
        triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k), grid,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        HAS_RESIDUAL=has_residual,
        NORM=normed is not None,
        EVEN_K=k % cfg.block_k == 0,
        W_PACK=pack,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
