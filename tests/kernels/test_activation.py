"""silu_and_mul against a float64 reference on strided inputs and outputs."""
import pytest
import torch
from hypothesis import given, strategies as st

from minidu.kernels.activation import silu_and_mul
from minidu.kernels import tiles as tile_table
from tests.conftest import DEVICE

# fp32 math then one rounding to the output dtype: a few fp32 ulps, or half an fp16 ulp plus that.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-4),
       torch.bfloat16: dict(rtol=8e-3, atol=1e-3)}


def reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


@given(t=st.sampled_from([0, 1, 2, 3, 7, 13]), inter=st.sampled_from([1, 7, 48, 64, 80, 96, 130]),
       dtype=st.sampled_from([torch.float32, torch.float16]), scale=st.sampled_from([1.0, 30.0]),
       pad_x=st.sampled_from([0, 3]), pad_out=st.sampled_from([0, 5]), num_sms=st.integers(1, 40),
       tiles=st.sampled_from([(32, 16), (tile_table.TILE_ELEMS, tile_table.TILE_COLS)]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference(t, inter, dtype, scale, pad_x, pad_out, num_sms, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    # Scale 30 drives exp(-gate) to overflow for very negative gates: silu must still give -0, not NaN.
    x = (scale * torch.randn(t, 2 * inter + pad_x, generator=gen)).to(DEVICE, dtype)[:, : 2 * inter]
    out = torch.full((t, inter + pad_out), float("nan"), dtype=dtype, device=DEVICE)[:, :inter]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "TILE_ELEMS", tiles[0])
        mp.setattr(tile_table, "TILE_COLS", tiles[1])
        result = silu_and_mul(x, num_sms=num_sms, out=out)
        single = silu_and_mul(x, num_sms=1)
    assert result is out
    torch.testing.assert_close(out.double(), reference(x), **TOL[dtype])
    assert torch.equal(out, single)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are only exact on CUDA")
@given(t=st.sampled_from([1, 5, 33]), inter=st.sampled_from([48, 1000, 3000]), seed=st.integers(0, 2**31 - 1))
def test_bf16_cuda(t, inter, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 2 * inter, generator=gen).to("cuda", torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x, num_sms=3).double(), reference(x), **TOL[torch.bfloat16])


def test_bad_inputs_name_the_argument():
    x = torch.randn(3, 8)
    cases = [
        (dict(x=x.long()), "x"),
        (dict(x=torch.randn(3, 7)), "x"),
        (dict(x=torch.randn(8)), "x"),
        (dict(x=torch.randn(8, 3).t()), "x"),
        (dict(out=torch.empty(3, 8)), "out"),
        (dict(out=torch.empty(3, 4, dtype=torch.float16)), "out"),
        (dict(out=torch.empty(4, 3).t()), "out"),
        (dict(num_sms=0), "num_sms"),
    ]
    for override, name in cases:
        args = dict(x=x) | override
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            silu_and_mul(args.pop("x"), **args)
