"""LatencyModel: FLOP and byte counts of a tiny model checked by hand, the roofline combination, and monotonicity."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidu.scheduler.hardware import HardwareProfile, load_profile
from minidu.scheduler.roofline import LatencyModel, ModelShape

# 2 layers, hidden 64, 4 query heads and 2 kv heads of 16, intermediate 128, vocab 100, bf16.
TINY = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                  vocab_size=100)
REQUESTS = [(3, 5), (1, 7)]  # T = 4 new tokens, 2 sampled rows


def profile(flops: float, bandwidth: float, *, num_sms: int = 8, saturation: int = 8,
            overhead: float = 0.0, **physics) -> HardwareProfile:
    """1-element GEMM tiles: every GEMM here has at least num_sms tiles in whole waves, so the hand counts hold."""
    return HardwareProfile("test", num_sms, flops, bandwidth, saturation, layer_overhead=overhead,
                           **({"gemm_tile": 1} | physics))


def causal_pairs(q: int, c: int) -> int:
    """(query, key) pairs: the query at position c + j sees keys 0..c + j."""
    return sum(c + j + 1 for j in range(q))


# Per layer, for REQUESTS (T = 4): (FLOPs, bytes) of each operator, counted by hand at 2 bytes per element.
TINY_LAYER_OPS = [
    (0, 2 * (4 * 4 * 64 + 64)),  # input norm: read x and residual, write residual and out (4 x [4, 64]), weight
    (2 * 4 * 128 * 64, 2 * (128 * 64 + 4 * 64 + 4 * 128)),  # qkv: [4, 64] x [128, 64]^T, 128 = (4 + 2 * 2) * 16
    (0, 2 * 2 * 4 * (64 + 32)),  # rotary: read and write q [4, 64] and k [4, 32]
    (0, 2 * 4 * 4 * 32),  # kv store: read k and v [4, 32], write both caches
    (4 * 4 * 16 * causal_pairs(3, 5), 2 * 16 * (2 * 3 * 4 + 2 * 8 * 2)),  # attention (3, 5): q, out; 8 keys+values
    (4 * 4 * 16 * causal_pairs(1, 7), 2 * 16 * (2 * 1 * 4 + 2 * 8 * 2)),  # attention (1, 7)
    (2 * 4 * 64 * 64, 2 * (64 * 64 + 4 * 64 + 4 * 64)),  # o projection
    (0, 2 * (4 * 4 * 64 + 64)),  # post-attention norm
    (2 * 4 * 256 * 64, 2 * (256 * 64 + 4 * 64 + 4 * 256)),  # gate_up
    (0, 2 * (4 * 256 + 4 * 128)),  # silu_and_mul: read [4, 256], write [4, 128]
    (2 * 4 * 64 * 128, 2 * (64 * 128 + 4 * 128 + 4 * 64)),  # down
]
TINY_HEAD_OPS = [
    (0, 2 * (4 * 4 * 64 + 64)),  # final norm
    (2 * 2 * 100 * 64, 2 * (100 * 64 + 2 * 64 + 2 * 100)),  # LM head on 2 rows
]


def reference_time(compute: float, bandwidth: float, overhead: float = 0.0) -> float:
    layer = sum(max(f / compute, b / bandwidth) for f, b in TINY_LAYER_OPS)
    return 2 * (layer + overhead) + sum(max(f / compute, b / bandwidth) for f, b in TINY_HEAD_OPS)


def test_bytes_of_a_bandwidth_bound_step():
    model = LatencyModel(TINY, profile(flops=1e30, bandwidth=1e9))
    total_bytes = 2 * sum(b for _, b in TINY_LAYER_OPS) + sum(b for _, b in TINY_HEAD_OPS)
    assert total_bytes == 202512  # the per-operator sums above, added up on paper
    assert model.step_time(REQUESTS, 8) == pytest.approx(total_bytes / 1e9, rel=1e-12)


def test_flops_of_a_compute_bound_step():
    model = LatencyModel(TINY, profile(flops=1e9, bandwidth=1e30))
    total_flops = 2 * sum(f for f, _ in TINY_LAYER_OPS) + sum(f for f, _ in TINY_HEAD_OPS)
    assert total_flops == 630272
    assert causal_pairs(3, 5) == 6 + 7 + 8
    assert model.step_time(REQUESTS, 8) == pytest.approx(total_flops / 1e9, rel=1e-9)


@pytest.mark.parametrize("num_sms", [1, 2, 4, 8])  # divide every GEMM's tiles: whole waves
def test_each_operator_takes_its_own_roofline_bound(num_sms):
    # Ridge 4 FLOP/B at 8 SMs (everything bandwidth-bound), 2 FLOP/B at 2 SMs (GEMMs and the prefill chunk's
    # attention turn compute-bound); bandwidth saturates at 4 SMs.
    hw = profile(flops=8e9, bandwidth=2e9, saturation=4, overhead=1e-7)
    model = LatencyModel(TINY, hw)
    compute, bandwidth = 8e9 * num_sms / 8, 2e9 * min(1, num_sms / 4)
    expected = reference_time(compute, bandwidth, overhead=1e-7)
    assert model.step_time(REQUESTS, num_sms) == pytest.approx(expected, rel=1e-12)


def test_bias_and_qk_norm_add_their_bytes():
    hw = profile(flops=1e30, bandwidth=1e9)
    base = LatencyModel(TINY, hw).step_time(REQUESTS, 8)
    biased = ModelShape(**{**_fields(TINY), "attention_bias": True})
    normed = ModelShape(**{**_fields(TINY), "qk_norm": True})
    # bias: 128 values per layer; q/k norm: read and write q and k [4, 64 + 32] plus two [16] weights per layer.
    assert LatencyModel(biased, hw).step_time(REQUESTS, 8) - base == pytest.approx(2 * 2 * 128 / 1e9, rel=1e-9)
    assert LatencyModel(normed, hw).step_time(REQUESTS, 8) - base == pytest.approx(
        2 * 2 * (2 * 4 * 96 + 2 * 16) / 1e9, rel=1e-9)


def _fields(shape: ModelShape) -> dict:
    return {name: getattr(shape, name) for name in ModelShape.__slots__}


def test_decode_time_is_one_token_per_request_and_empty_step_is_free():
    model = LatencyModel(TINY, profile(flops=8e9, bandwidth=2e9, overhead=1e-6))
    assert model.decode_time([5, 0, 9], 4) == model.step_time([(1, 5), (1, 0), (1, 9)], 4)
    assert model.step_time([], 8) == 0.0
    assert model.decode_time([], 8) == 0.0


@pytest.mark.parametrize("requests", [[(0, 3)], [(2, -1)], [(1.0, 2)], [(1, 2, 3)], [(True, 2)]])
def test_bad_requests_raise(requests):
    with pytest.raises(ValueError, match="requests"):
        LatencyModel(TINY, profile(1e9, 1e9)).step_time(requests, 8)


@pytest.mark.parametrize("change, match", [({"num_heads": 3}, "num_kv_heads"), ({"head_dim": 0}, "head_dim"),
                                           ({"num_layers": 2.0}, "num_layers")])
def test_bad_shape_raises(change, match):
    with pytest.raises(ValueError, match=match):
        ModelShape(**{**_fields(TINY), **change})


def test_budget_beyond_the_gpu_raises():
    with pytest.raises(ValueError, match="num_sms"):
        LatencyModel(TINY, profile(1e9, 1e9)).step_time(REQUESTS, 9)


QWEN3_8B = ModelShape(num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=12288, vocab_size=151936, qk_norm=True)
H200 = LatencyModel(QWEN3_8B, load_profile("h200"))
requests_st = st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 32768)), min_size=1, max_size=8)
sms_st = st.integers(1, 132)


@given(requests=requests_st, a=sms_st, b=sms_st)
def test_more_sms_is_never_slower(requests, a, b):
    low, high = sorted((a, b))
    assert H200.step_time(requests, high) <= H200.step_time(requests, low) * (1 + 1e-12)


@given(requests=requests_st, s=sms_st, index=st.integers(0, 7), extra=st.integers(1, 2048), new=st.booleans())
def test_more_tokens_or_context_is_never_faster(requests, s, index, extra, new):
    i = index % len(requests)
    q, c = requests[i]
    base = H200.step_time(requests, s)
    more_tokens = requests[:i] + [(q + extra, c)] + requests[i + 1:]
    more_context = requests[:i] + [(q, c + extra)] + requests[i + 1:]
    assert H200.step_time(more_tokens, s) >= base * (1 - 1e-12)
    assert H200.step_time(more_context, s) >= base * (1 - 1e-12)
    if new:
        assert H200.step_time(requests + [(extra, c)], s) >= base * (1 - 1e-12)


def test_wave_quantisation_and_gemm_efficiency():
    # Compute-bound; with 1-element tiles a GEMM over m rows and n columns has m * n tiles.
    hw = profile(flops=8e9, bandwidth=1e30, gemm_efficiency_by_tokens={2: 0.5, 8: 1.0})
    model = LatencyModel(TINY, hw)
    work = model.work([(4, 0)])  # 4 rows through the layers, 1 sampled row through the LM head
    assert [(m, n) for m, n, _, _ in work.gemms] == [(4, 128), (4, 64), (4, 256), (4, 64), (1, 100)]
    efficiency = {4: 0.5 + 0.5 * (4 - 2) / (8 - 2), 1: 0.5}  # interpolated; held below the first row count
    for num_sms in (3, 5, 7):
        compute = 8e9 * num_sms / 8
        expected = work.roofline_time(compute, 1e30) + hw.layer_overhead * 2
        for m, n, flops, _ in work.gemms:
            wave = m * n / (math.ceil(m * n / num_sms) * num_sms)
            expected += flops / (compute * efficiency[m] * wave)
        assert model.time(work, num_sms) == pytest.approx(expected, rel=1e-12)


def test_gemm_with_fewer_tiles_than_programs_loads_through_fewer_sms():
    hw = profile(flops=1e30, bandwidth=8e9, saturation=8, gemm_tile=64)  # one 64x64 tile per GEMM below 64 rows
    model = LatencyModel(TINY, hw)
    work = model.work([(1, 0)])
    gemm_bytes = sum(b for *_, b in work.gemms)
    tiles = [math.ceil(n / 64) for _, n, _, _ in work.gemms]  # 128 -> 2, 64 -> 1, 256 -> 4, 64 -> 1, 100 -> 2
    expected = work.roofline_time(1e30, 8e9) + sum(b / (8e9 * t / 8) for (*_, b), t in zip(work.gemms, tiles))
    assert model.time(work, 8) == pytest.approx(expected, rel=1e-12)
    assert model.time(work, 8) > work.roofline_time(1e30, 8e9) + gemm_bytes / 8e9


def test_side_by_side_shares_bandwidth_slows_decode_and_pays_the_period():
    hw = profile(flops=1e30, bandwidth=1e9, num_sms=8, saturation=2, corun_decode_slowdown=0.25,
                 period_overhead=1e-4)
    model = LatencyModel(TINY, hw)
    prefill, decode = model.work([(3, 5)]), model.work([(1, 7)])
    t_p, t_d = model.time(prefill, 4), model.time(decode, 4)  # both bandwidth-bound at the full 1e9 B/s
    assert (t_p, t_d) == pytest.approx((prefill.total_bytes / 1e9, decode.total_bytes / 1e9), rel=1e-12)
    # Together they demand 2e9 B/s of a 1e9 B/s device: each gets half, so each takes twice as long.
    shared_p, shared_d = model.multiplexed_times(prefill, 4, decode, 4)
    assert shared_p == pytest.approx(2 * t_p, rel=1e-12)
    assert shared_d == pytest.approx(2 * t_d * 1.25, rel=1e-12)
    assert model.period_time(3, shared_d, shared_p) == pytest.approx(max(3 * shared_d, shared_p) + 1e-4)
    assert model.multiplexed_times(model.work([]), 4, decode, 4) == (0.0, t_d)  # alone: no contention, no slowdown
    assert model.period_time(3, t_d, 0.0) == 3 * t_d
