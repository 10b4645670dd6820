"""rms_norm against a float64 reference: plain, fused residual add, per-head views of a fused qkv buffer."""
import pytest
import torch
from hypothesis import given, strategies as st

from minidu.kernels.rmsnorm import rms_norm
from minidu.kernels import tiles as tile_table
from tests.conftest import DEVICE

# The kernel rounds the normalised row to the activation dtype before the weight multiply (HF order) and rounds the
# product again, so fp16 may be off by about two fp16 ulps (2 * 2**-11 relative) from the unrounded reference.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

tokens = st.sampled_from([0, 1, 2, 3, 5, 7, 13, 17])
hiddens = st.sampled_from([48, 64, 80, 96, 128, 33])
dtypes = st.sampled_from([torch.float32, torch.float16])
# Small tiles force several tiles (and several rows per tile) through the persistent loop.
tile_elems = st.sampled_from([64, 256, tile_table.TILE_ELEMS])


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def strided_rows(t: int, h: int, dtype: torch.dtype, gen: torch.Generator, pad: int) -> torch.Tensor:
    """x [t, h] whose rows sit `pad` elements apart from each other inside a wider buffer."""
    return torch.randn(t, h + pad, generator=gen).to(DEVICE, dtype)[:, pad // 2: pad // 2 + h]


@given(t=tokens, h=hiddens, dtype=dtypes, pad=st.sampled_from([0, 5]), eps=st.sampled_from([1e-6, 1e-5, 0.1]),
       num_sms=st.integers(1, 40), tiles=tile_elems, seed=st.integers(0, 2**31 - 1))
def test_matches_reference(t, h, dtype, pad, eps, num_sms, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    x = strided_rows(t, h, dtype, gen, pad)
    weight = (1 + 0.5 * torch.randn(h, generator=gen)).to(DEVICE, dtype)
    out = torch.full((t, h), float("nan"), dtype=dtype, device=DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "TILE_ELEMS", tiles)
        result = rms_norm(x, weight, eps, num_sms=num_sms, out=out)
        single = rms_norm(x, weight, eps, num_sms=1)
    assert result is out and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(x, weight, eps), **TOL[dtype])
    assert torch.equal(out, single)


@given(t=tokens, h=hiddens, dtype=dtypes, pad=st.sampled_from([0, 3]), num_sms=st.integers(1, 40),
       tiles=tile_elems, seed=st.integers(0, 2**31 - 1))
def test_fused_residual(t, h, dtype, pad, num_sms, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    x = strided_rows(t, h, dtype, gen, pad)
    residual = torch.randn(t, h, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(h, generator=gen).to(DEVICE, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    summed = (x.double() + residual.double()).to(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "TILE_ELEMS", tiles)
        out, res = rms_norm(x, weight, 1e-6, residual=residual, num_sms=num_sms)
        residual_again = residual_before.clone()
        out_single, _ = rms_norm(x, weight, 1e-6, residual=residual_again, num_sms=1)
    assert res is residual and torch.equal(x, x_before)
    torch.testing.assert_close(residual.double(), summed.double(), **TOL[dtype])
    # The norm is of the sum as stored in the residual's dtype.
    torch.testing.assert_close(out.double(), reference(residual, weight, 1e-6), **TOL[dtype])
    assert torch.equal(out, out_single) and torch.equal(residual, residual_again)


@given(t=tokens, hq=st.sampled_from([1, 2, 4, 6]), hk=st.sampled_from([1, 2]), d=st.sampled_from([48, 64, 80, 128]),
       dtype=dtypes, in_place=st.booleans(), num_sms=st.integers(1, 40), tiles=tile_elems,
       seed=st.integers(0, 2**31 - 1))
def test_per_head_view_of_fused_qkv(t, hq, hk, d, dtype, in_place, num_sms, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(DEVICE, dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    weight = torch.randn(d, generator=gen).to(DEVICE, dtype)
    before = qkv.clone()
    expected_q, expected_k = reference(q, weight, 1e-6), reference(k, weight, 1e-6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "TILE_ELEMS", tiles)
        single_q = rms_norm(q, weight, 1e-6, num_sms=1)
        out_q = rms_norm(q, weight, 1e-6, num_sms=num_sms, out=q if in_place else None)
        out_k = rms_norm(k, weight, 1e-6, num_sms=num_sms, out=k if in_place else None)
    torch.testing.assert_close(out_q.double(), expected_q, **TOL[dtype])
    torch.testing.assert_close(out_k.double(), expected_k, **TOL[dtype])
    assert torch.equal(out_q, single_q)
    untouched = slice((hq + hk) * d, None) if in_place else slice(None)
    assert torch.equal(qkv[:, untouched], before[:, untouched])


def test_hf_order_rounds_before_weight():
    # With weight 3 the HF order (round, then scale) and scale-then-round differ in fp16 for some inputs.
    x = torch.linspace(-2, 2, 64, dtype=torch.float64).reshape(2, 32).to(DEVICE, torch.float16)
    weight = torch.full((32,), 3.0, dtype=torch.float16, device=DEVICE)
    x64 = x.double()
    normed = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.float16)
    hf = (normed.double() * 3.0).to(torch.float16)
    unfused = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * 3.0).to(torch.float16)
    assert not torch.equal(hf, unfused)
    assert torch.equal(rms_norm(x, weight, 1e-6), hf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are only exact on CUDA")
@given(t=tokens, h=hiddens, seed=st.integers(0, 2**31 - 1))
def test_bf16_cuda(t, h, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to("cuda", torch.bfloat16)
    residual = torch.randn(t, h, generator=gen).to("cuda", torch.bfloat16)
    weight = torch.randn(h, generator=gen).to("cuda", torch.bfloat16)
    summed = (x.double() + residual.double()).to(torch.bfloat16)
    out, _ = rms_norm(x, weight, 1e-6, residual=residual, num_sms=3)
    torch.testing.assert_close(residual.double(), summed.double(), **TOL[torch.bfloat16])
    torch.testing.assert_close(out.double(), reference(summed, weight, 1e-6), **TOL[torch.bfloat16])


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(3, 8), torch.ones(8)
    cases = [
        (dict(x=x.long()), "x"),
        (dict(x=torch.randn(2, 3, 4, 8)), "x"),
        (dict(x=torch.randn(8, 3).t()), "x"),
        (dict(weight=torch.ones(7)), "weight"),
        (dict(weight=torch.ones(8, 1)), "weight"),
        (dict(eps=-1.0), "eps"),
        (dict(eps="1e-6"), "eps"),
        (dict(residual=torch.randn(3, 7)), "residual"),
        (dict(residual=torch.randn(3, 8, dtype=torch.float16)), "residual"),
        (dict(out=torch.empty(3, 8, dtype=torch.float16)), "out"),
        (dict(out=torch.empty(8, 3).t()), "out"),
        (dict(num_sms=0), "num_sms"),
    ]
    for override, name in cases:
        args = dict(x=x, weight=w, eps=1e-6) | override
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            rms_norm(args.pop("x"), args.pop("weight"), args.pop("eps"), **args)
