"""Property tests of the persistent GEMM against a float64 PyTorch reference.

Tolerances bound |gemm - ref| by rtol * (|x| @ |w|.T + |bias|), the scale of the rounding errors of a dot product:
fp32 rtol 1e-5 (the kernel uses ieee fp32 dots, no tf32; K <= 200 here so even the worst case K * 2**-24 stays near it),
fp16 rtol 2e-3 (the fp16 output rounding is 2**-11 ~ 4.9e-4 relative; accumulation is fp32),
bf16 rtol 1.6e-2 (2**-8 output rounding).
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from minidu.kernels.activation import silu_and_mul
from minidu.kernels.gemm import gemm
from minidu.kernels.rmsnorm import rms_norm
from minidu.kernels import tiles as tile_table
from minidu.kernels.tiles import SM80, SM90, cuda_gemm_config, gemm_shared_bytes
from tests.conftest import DEVICE
from tests.kernels.shapes import preset_shapes

RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Shapes mix tiny, prime and non-power-of-two sizes; the sampled large ones span several tiles in M or N.
ms = st.one_of(st.sampled_from([1, 2, 3, 7, 13, 17, 31, 67, 131]), st.integers(1, 80))
ns = st.one_of(st.sampled_from([1, 5, 31, 97, 257, 2053]), st.integers(1, 300))
ks = st.one_of(st.sampled_from([1, 3, 17, 64, 127, 130]), st.integers(1, 200))


def _operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int, x_pad: int = 0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x_buf = torch.randn(m, k + x_pad, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return x_buf[:, :k].to(device), w.to(device), bias.to(device)


def _assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    x, w, y = x.cpu(), w.cpu(), y.cpu()
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if bias is not None:
        ref += bias.cpu().double()
        scale += bias.cpu().double().abs()
    err = (y.double() - ref).abs()
    bound = RTOL[x.dtype] * scale + 1e-30
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item():.3e}"


@given(m=ms, n=ns, k=ks, has_bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       num_sms=st.integers(1, 64), x_pad=st.integers(0, 3), out_pad=st.integers(0, 3), seed=st.integers(0, 2**16))
@example(m=131, n=2053, k=130, has_bias=True, dtype=torch.float32, num_sms=5, x_pad=1, out_pad=2, seed=0)
@example(m=577, n=37, k=19, has_bias=False, dtype=torch.float16, num_sms=3, x_pad=0, out_pad=1, seed=1)
def test_gemm_matches_float64_reference(m, n, k, has_bias, dtype, num_sms, x_pad, out_pad, seed):
    x, w, bias = _operands(m, n, k, dtype, seed, x_pad)
    bias = bias if has_bias else None
    out_buf = torch.full((m, n + out_pad), math.nan, dtype=dtype)
    y = gemm(x, w, bias, num_sms=num_sms, out=out_buf[:, :n])
    assert y.data_ptr() == out_buf.data_ptr() and y.shape == (m, n)
    _assert_close(y, x, w, bias)
    assert torch.isnan(out_buf[:, n:]).all(), "wrote past the out view's columns"


@given(m=ms, n=ns, k=ks, dtype=st.sampled_from([torch.float32, torch.float16]))
def test_gemm_allocates_output_of_x_dtype(m, n, k, dtype):
    x, w, bias = _operands(m, n, k, dtype, seed=m * n + k)
    y = gemm(x, w, bias)
    assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
    _assert_close(y, x, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_bitwise_identical_for_any_num_sms(dtype):
    # 131 rows and 2053 columns span several row and column tiles on every device.
    x, w, bias = _operands(131, 2053, 19, dtype, seed=7)
    first = gemm(x, w, bias, num_sms=1)
    for num_sms in (2, 3, 7, None):
        assert torch.equal(gemm(x, w, bias, num_sms=num_sms), first), f"num_sms={num_sms}"


@given(m=ms, n=ns, k=ks, has_bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       num_sms=st.integers(1, 64), seed=st.integers(0, 2**16))
@example(m=67, n=257, k=130, has_bias=True, dtype=torch.float32, num_sms=3, seed=0)
def test_gemm_silu_mul_prologue_equals_silu_and_mul_then_gemm(m, n, k, has_bias, dtype, num_sms, seed):
    gate_up, w, bias = _operands(m, n, 2 * k, dtype, seed)
    w, bias = w[:, :k].contiguous(), bias if has_bias else None
    fused = gemm(gate_up, w, bias, num_sms=num_sms, silu_mul=True)
    act = silu_and_mul(gate_up)
    assert torch.equal(fused, gemm(act, w, bias, num_sms=num_sms))
    # And against float64 math on the activation, so the pair cannot be wrong together.
    gate, up = gate_up.cpu().double().chunk(2, dim=1)
    act_ref = (gate * torch.sigmoid(gate) * up).to(dtype)
    _assert_close(fused, act_ref, w, bias)


@given(m=ms, n=ns, k=ks, has_bias=st.booleans(), has_residual=st.booleans(), silu_mul=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), num_sms=st.integers(1, 64), fused=st.booleans(),
       seed=st.integers(0, 2**16))
@example(m=67, n=576, k=130, has_bias=True, has_residual=True, silu_mul=True, dtype=torch.float32, num_sms=3,
         fused=True, seed=0)
@example(m=3, n=5, k=3, has_bias=False, has_residual=True, silu_mul=False, dtype=torch.float16, num_sms=1,
         fused=True, seed=2)
def test_gemm_residual_and_norm_epilogue(m, n, k, has_bias, has_residual, silu_mul, dtype, num_sms, fused, seed):
    """Fused (the interpreter's epilogue) or not (gemm then rms_norm, as on CUDA), the same properties hold."""
    x, w, bias = _operands(m, n, 2 * k if silu_mul else k, dtype, seed)
    w, bias = w[:, :k].contiguous(), bias if has_bias else None
    gen = torch.Generator().manual_seed(seed + 1)
    residual = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE) if has_residual else None
    norm_weight = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    before = residual.clone() if has_residual else None
    with pytest.MonkeyPatch.context() as mp:
        if not fused:
            mp.setattr(tile_table, "NORM_EPILOGUE_MAX_N", 0)
        total, normed = gemm(x, w, bias, num_sms=num_sms, silu_mul=silu_mul, residual=residual,
                             norm_weight=norm_weight, eps=1e-5)
    if has_residual:
        assert total.data_ptr() == residual.data_ptr(), "the sum goes to residual, in place"
    # The norm is bitwise rms_norm's of the stored sum (whatever kernel computed it) ...
    assert torch.equal(normed, rms_norm(total, norm_weight, 1e-5))
    # ... and the sum is the product plus the residual, against float64 math.
    if silu_mul:
        gate, up = x.cpu().double().chunk(2, dim=1)
        x = (gate * torch.sigmoid(gate) * up).to(dtype)
    ref = x.cpu().double() @ w.cpu().double().T + (bias.cpu().double() if has_bias else 0)
    scale = x.cpu().double().abs() @ w.cpu().double().abs().T + (bias.cpu().double().abs() if has_bias else 0)
    if has_residual:
        ref, scale = ref + before.cpu().double(), scale + before.cpu().double().abs()
    # Two roundings to dtype (the product, then the sum) on top of the dot's own error.
    eps_dtype = torch.finfo(dtype).eps
    assert torch.all((total.cpu().double() - ref).abs() <= RTOL[dtype] * scale + 2 * eps_dtype * scale + 1e-30)


@pytest.mark.parametrize("m,n,k", [(0, 5, 3), (4, 0, 3), (3, 6, 0)])
def test_gemm_degenerate_shapes(m, n, k):
    x, w, bias = _operands(m, n, k, torch.float32, seed=3)
    y = gemm(x, w, bias, num_sms=2)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, bias.expand(m, n), rtol=0, atol=0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="tl.dot on bf16 is wrong in Triton's CPU interpreter")
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (17, 1000, 777), (300, 6144, 4096)])
def test_gemm_bf16_cuda(m, n, k):
    x, w, bias = _operands(m, n, k, torch.bfloat16, seed=11)
    _assert_close(gemm(x, w, bias), x, w, bias)
    assert torch.equal(gemm(x, w, bias, num_sms=8), gemm(x, w, bias, num_sms=None))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="interpreted tiles depend on M; CUDA tiles only on (N, K)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemm_rows_independent_of_batch_on_cuda(dtype):
    x, w, bias = _operands(2048, 6144, 4096, dtype, seed=13)
    full = gemm(x, w, bias)
    for m in (1, 16, 33, 64, 300):
        assert torch.equal(gemm(x[:m], w, bias, num_sms=17), full[:m]), f"M={m}"


@pytest.mark.parametrize("target", [SM90, SM80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_cuda_tiles_fit_shared_memory(target, itemsize):
    """The bug this guards: 64x64x256 tiles with 4 stages needed 256 KB, over both targets' limits."""
    for n, k in set().union(*(p.projections() for p in preset_shapes())):
        cfg = cuda_gemm_config(n, k, itemsize, target)
        assert gemm_shared_bytes(cfg, itemsize) <= target.shared_memory, (n, k, cfg)
        assert cfg.num_stages >= 2, (n, k, cfg)


def _bad_inputs():
    x, w, bias = _operands(4, 6, 5, torch.float32, seed=5)
    return [
        ("x", lambda: gemm(x[0], w)),
        ("x", lambda: gemm(x.long(), w)),
        ("x", lambda: gemm(torch.randn(5, 4).T, w)),
        ("w", lambda: gemm(x, w.half())),
        ("w", lambda: gemm(x, w[:, :4])),
        ("w", lambda: gemm(x, w.unsqueeze(0))),
        ("w", lambda: gemm(x, torch.randn(5, 6).T)),
        ("w", lambda: gemm(x, w.to("meta"))),
        ("bias", lambda: gemm(x, w, bias[:5])),
        ("bias", lambda: gemm(x, w, bias.half())),
        ("bias", lambda: gemm(x, w, bias.to("meta"))),
        ("out", lambda: gemm(x, w, out=torch.empty(4, 5))),
        ("out", lambda: gemm(x, w, out=torch.empty(4, 6, dtype=torch.float16))),
        ("out", lambda: gemm(x, w, out=torch.empty(6, 4).T)),
        ("x", lambda: gemm(x, w, silu_mul=True)),
        ("w", lambda: gemm(torch.cat([x, x], dim=1)[:, :8], w, silu_mul=True)),
        ("residual", lambda: gemm(x, w, residual=torch.zeros(4, 5), norm_weight=bias, eps=1e-6)),
        ("residual", lambda: gemm(x, w, residual=torch.zeros(4, 6))),
        ("out", lambda: gemm(x, w, out=torch.empty(4, 6), residual=torch.zeros(4, 6), norm_weight=bias, eps=1e-6)),
        ("norm_weight", lambda: gemm(x, w, norm_weight=bias[:5], eps=1e-6)),
        ("eps", lambda: gemm(x, w, norm_weight=bias, eps=-1.0)),
        ("eps", lambda: gemm(x, w, norm_weight=bias)),
        ("num_sms", lambda: gemm(x, w, num_sms=0)),
        ("num_sms", lambda: gemm(x[:0], w, num_sms=-1)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_gemm_rejects_bad_inputs(case):
    name, call = _bad_inputs()[case]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()
