"""rope_inv_freq against independent float64 formulas; rotary_embedding against a float64 rotate-half reference."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from minidu.kernels import tiles as tile_table
from minidu.kernels.kv_cache import store_kvcache
from minidu.kernels.rotary import rope_inv_freq, rotary_embedding, rotary_embedding_and_store_kvcache
from tests.conftest import DEVICE

# After the fp32 angle, the kernel's fp32 cos/sin and rotation are within a few fp32 ulps of float64; fp16 adds one
# rounding of the result (2**-11 relative).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

head_dims = st.sampled_from([48, 64, 80, 96, 128, 34])
dtypes = st.sampled_from([torch.float32, torch.float16])


def default_inv_freq64(head_dim: int, theta: float) -> list[float]:
    return [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]


def llama3_inv_freq64(head_dim: int, theta: float, factor: float, low: float, high: float, original: int):
    """Llama 3.1's frequency bands, written per frequency in float64."""
    result = []
    for freq in default_inv_freq64(head_dim, theta):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            result.append(freq)
        elif wavelen > original / low:
            result.append(freq / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            result.append((1 - smooth) * freq / factor + smooth * freq)
    return result


def as64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@given(head_dim=head_dims, theta=st.sampled_from([10000.0, 500000.0, 1e6]),
       scaling=st.sampled_from([None, {"rope_type": "default"}, {"type": "default"}]))
def test_inv_freq_default(head_dim, theta, scaling):
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (head_dim // 2,)
    torch.testing.assert_close(inv_freq.double(), as64(default_inv_freq64(head_dim, theta)), rtol=1e-6, atol=0)


@given(head_dim=head_dims, factor=st.floats(1.0, 64.0), key=st.sampled_from(["rope_type", "type"]))
def test_inv_freq_linear(head_dim, factor, key):
    inv_freq = rope_inv_freq(head_dim, 10000.0, {key: "linear", "factor": factor})
    expected = as64(default_inv_freq64(head_dim, 10000.0)) / factor
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)


@given(head_dim=head_dims, theta=st.sampled_from([10000.0, 500000.0]), factor=st.floats(1.0, 64.0),
       low=st.sampled_from([0.5, 1.0, 2.0]), high=st.sampled_from([4.0, 8.0]),
       original=st.sampled_from([2048, 8192, 32768]))
def test_inv_freq_llama3(head_dim, theta, factor, low, high, original):
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": original}
    expected = as64(llama3_inv_freq64(head_dim, theta, factor, low, high, original))
    torch.testing.assert_close(rope_inv_freq(head_dim, theta, scaling).double(), expected, rtol=1e-5, atol=0)


def test_inv_freq_llama31_bands():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    scaled, plain = rope_inv_freq(128, 500000.0, scaling), rope_inv_freq(128, 500000.0, None)
    wavelen = 2 * math.pi / plain
    short, long = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
    assert short.any() and long.any() and (~short & ~long).any()
    assert torch.equal(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8.0)
    middle = ~short & ~long
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8.0)).all()


def test_inv_freq_errors():
    with pytest.raises(ValueError, match="longrope"):
        rope_inv_freq(64, 10000.0, {"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(64, 10000.0, {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
    with pytest.raises(ValueError, match="factor"):
        rope_inv_freq(64, 10000.0, {"rope_type": "linear"})
    with pytest.raises(ValueError, match="head_dim"):
        rope_inv_freq(63, 10000.0, None)
    with pytest.raises(ValueError, match="rope_theta"):
        rope_inv_freq(64, 0.0, None)


def reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half in float64, from the fp32 angle the kernel (and HF) form: position.float() * inv_freq."""
    angles = (positions.float()[:, None] * inv_freq[None, :]).double()
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    x = x.double()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@given(t=st.sampled_from([0, 1, 2, 3, 7, 13]), hk=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 2, 4, 8]),
       d=head_dims, dtype=dtypes, pos_dtype=st.sampled_from([torch.int32, torch.int64]),
       max_pos=st.sampled_from([16, 4096, 131072]), num_sms=st.integers(1, 40),
       tiles=st.sampled_from([64, tile_table.ROTARY_TILE_ELEMS]), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_on_fused_qkv_views(t, hk, ratio, d, dtype, pos_dtype, max_pos, num_sms, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = hk * ratio
    qkv = torch.randn(t, (hq + 2 * hk) * d + 3, generator=gen).to(DEVICE, dtype)
    positions = torch.randint(0, max_pos, (t,), generator=gen, dtype=pos_dtype).to(DEVICE)
    inv_freq = rope_inv_freq(d, 10000.0, None).to(DEVICE)
    q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    expected_q, expected_k = reference(q, positions, inv_freq), reference(k, positions, inv_freq)
    before, again = qkv.clone(), qkv.clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "ROTARY_TILE_ELEMS", tiles)
        rotary_embedding(q, k, positions, inv_freq, num_sms=num_sms)
        rotary_embedding(again[:, : hq * d].view(t, hq, d), again[:, hq * d: (hq + hk) * d].view(t, hk, d),
                         positions, inv_freq, num_sms=1)
    torch.testing.assert_close(q.double(), expected_q, **TOL[dtype])
    torch.testing.assert_close(k.double(), expected_k, **TOL[dtype])
    assert torch.equal(qkv[:, (hq + hk) * d:], before[:, (hq + hk) * d:])
    assert torch.equal(qkv, again)


@given(t=st.sampled_from([0, 1, 3, 7, 13]), hk=st.sampled_from([1, 2, 3]), ratio=st.sampled_from([1, 3, 4]),
       d=head_dims, dtype=dtypes, block_size=st.sampled_from([1, 4, 16]), skip=st.sampled_from([0.0, 0.4]),
       num_sms=st.integers(1, 40), tiles=st.sampled_from([64, tile_table.ROTARY_TILE_ELEMS]), seed=st.integers(0, 2**31 - 1))
def test_fused_store_equals_rotary_then_store_kvcache(t, hk, ratio, d, dtype, block_size, skip, num_sms, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = hk * ratio
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(DEVICE, dtype)
    positions = torch.randint(0, 4096, (t,), generator=gen).to(DEVICE)
    num_blocks = max(1, -(-(t + 3) // block_size))
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots = torch.where(torch.rand(t, generator=gen) < skip, -1, slots).to(DEVICE, torch.int32)
    inv_freq = rope_inv_freq(d, 10000.0, None).to(DEVICE)
    fused, unfused = qkv.clone(), qkv.clone()
    caches = [torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype, device=DEVICE)
              for _ in range(4)]

    def views(buf):
        return (buf[:, : hq * d].view(t, hq, d), buf[:, hq * d: (hq + hk) * d].view(t, hk, d),
                buf[:, (hq + hk) * d:].view(t, hk, d))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "ROTARY_TILE_ELEMS", tiles)
        rotary_embedding_and_store_kvcache(*views(fused), positions, inv_freq, caches[0], caches[1], slots,
                                           attention_factor=1.5, num_sms=num_sms)
    q, k, v = views(unfused)
    rotary_embedding(q, k, positions, inv_freq, attention_factor=1.5)
    store_kvcache(k, v, caches[2], caches[3], slots)
    assert torch.equal(fused, unfused)
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
    # Independently of store_kvcache: the stored tokens' k is the float64 rotation.
    stored = slots >= 0
    flat_k = caches[0].view(-1, hk, d)[slots[stored].long()]
    expected_k = reference(views(qkv)[1], positions, inv_freq)[stored] * 1.5
    torch.testing.assert_close(flat_k.double().cpu(), expected_k.cpu(), **TOL[dtype])


def test_fused_store_rejects_bad_cache_arguments():
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    positions, inv_freq = torch.arange(3), rope_inv_freq(16, 10000.0, None)
    cache, slots = torch.zeros(2, 4, 2, 16), torch.arange(3)
    split_heads = torch.randn(3, 2, 32)[:, :, :16]
    for args, name in (((v[:, :1], cache, cache, slots), "v"), ((split_heads, cache, cache, slots), "v"),
                       ((v, cache.half(), cache, slots), "k_cache"),
                       ((v, cache, cache[:1], slots), "v_cache"), ((v, cache, cache, slots[:2]), "slot_mapping")):
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            rotary_embedding_and_store_kvcache(q, k, args[0], positions, inv_freq, *args[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are only exact on CUDA")
@given(t=st.sampled_from([1, 5, 33]), d=head_dims, seed=st.integers(0, 2**31 - 1))
def test_bf16_cuda(t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, 8, d, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(t, 2, d, generator=gen).to("cuda", torch.bfloat16)
    positions = torch.randint(0, 8192, (t,), generator=gen).cuda()
    inv_freq = rope_inv_freq(d, 500000.0, None).cuda()
    expected_q, expected_k = reference(q, positions, inv_freq), reference(k, positions, inv_freq)
    rotary_embedding(q, k, positions, inv_freq, num_sms=2)
    torch.testing.assert_close(q.double(), expected_q, **TOL[torch.bfloat16])
    torch.testing.assert_close(k.double(), expected_k, **TOL[torch.bfloat16])


def test_bad_inputs_name_the_argument():
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    positions, inv_freq = torch.arange(3), rope_inv_freq(16, 10000.0, None)
    cases = [
        (dict(q=q.long()), "q"),
        (dict(q=torch.randn(3, 16)), "q"),
        (dict(q=torch.randn(3, 4, 15)), "q"),
        (dict(q=torch.randn(3, 16, 4).transpose(1, 2)), "q"),
        (dict(q=torch.randn(3, 4, 32)[:, :, :16]), "q"),  # heads not adjacent within the token
        (dict(k=torch.randn(2, 3, 16).transpose(0, 1)), "k"),
        (dict(k=torch.randn(3, 2, 8)), "k"),
        (dict(k=torch.randn(4, 2, 16)), "k"),
        (dict(k=k.half()), "k"),
        (dict(positions=positions.float()), "positions"),
        (dict(positions=torch.arange(4)), "positions"),
        (dict(inv_freq=inv_freq.double()), "inv_freq"),
        (dict(inv_freq=inv_freq[:4]), "inv_freq"),
        (dict(num_sms=0), "num_sms"),
    ]
    for override, name in cases:
        args = dict(q=q, k=k, positions=positions, inv_freq=inv_freq) | override
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            rotary_embedding(args.pop("q"), args.pop("k"), args.pop("positions"), args.pop("inv_freq"), **args)
