"""HardwareProfile: the saturation model, measured-table interpolation, presets and JSON round trips."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidu.scheduler.hardware import HardwareProfile, load_profile


def small_profile(**overrides) -> HardwareProfile:
    fields = dict(name="toy", num_sms=10, peak_flops=5e12, mem_bandwidth=8e11, bandwidth_saturation_sms=4)
    return HardwareProfile(**(fields | overrides))


def test_model_compute_is_linear_and_bandwidth_saturates():
    hw = small_profile()
    # 5e12 FLOP/s over 10 SMs is 5e11 per SM; 8e11 B/s reached at 4 SMs is 2e11 per SM below the knee.
    assert [hw.compute(s) for s in (1, 4, 10)] == pytest.approx([5e11, 2e12, 5e12], rel=1e-12)
    assert [hw.bandwidth(s) for s in (1, 2, 3, 4, 7, 10)] == pytest.approx([2e11, 4e11, 6e11, 8e11, 8e11, 8e11],
                                                                          rel=1e-12)


def test_tables_interpolate_piecewise_linearly_with_running_max():
    hw = small_profile(flops_by_sms={2: 4.0, 6: 3.0, 8: 10.0}, bandwidth_by_sms={5: 1.0})
    # Below 2 SMs: scaled from the origin (4 * 1/2). 6 SMs measured 3 < 4 at 2 SMs: noise, held at 4.
    # 7 SMs: halfway between 4 (6 SMs) and 10 (8 SMs). Above 8: held at 10.
    expected = {1: 2.0, 2: 4.0, 3: 4.0, 6: 4.0, 7: 7.0, 8: 10.0, 10: 10.0}
    assert {s: hw.compute(s) for s in expected} == pytest.approx(expected, rel=1e-12)
    assert [hw.bandwidth(s) for s in (1, 5, 10)] == pytest.approx([0.2, 1.0, 1.0], rel=1e-12)


@pytest.mark.parametrize("name, num_sms, flops, bandwidth", [
    ("h100", 132, 989e12, 3.35e12), ("H200", 132, 989e12, 4.8e12), ("a100", 108, 312e12, 2.0e12)])
def test_presets_are_achievable_fractions_of_the_datasheet(name, num_sms, flops, bandwidth):
    hw = load_profile(name)
    assert hw.num_sms == num_sms
    assert 0.6 * flops <= hw.compute(num_sms) <= flops
    assert 0.8 * bandwidth <= hw.bandwidth(num_sms) <= bandwidth
    # HBM saturates with a third to a half of the SMs.
    assert num_sms / 3 <= hw.bandwidth_saturation_sms <= num_sms / 2
    assert hw.bandwidth(hw.bandwidth_saturation_sms - 1) < hw.bandwidth(num_sms)


def test_json_round_trip_through_a_file(tmp_path):
    hw = small_profile(flops_by_sms={2: 1e12, 10: 4e12}, bandwidth_by_sms={4: 7e11}, metadata={"gpu": "toy"},
                       layer_overhead=3e-6, corun_decode_slowdown=0.2, period_overhead=1e-4, gemm_tile=64,
                       gemm_efficiency_by_tokens={128: 0.6, 1024: 0.9})
    path = tmp_path / "profile.json"
    path.write_text(hw.to_json())
    assert json.loads(path.read_text())["flops_by_sms"] == {"2": 1e12, "10": 4e12}
    loaded = load_profile(path)
    assert loaded == hw
    assert loaded.compute(6) == hw.compute(6) == pytest.approx(2.5e12, rel=1e-12)
    assert load_profile(str(path)) == hw
    assert loaded.gemm_efficiency(576) == pytest.approx(0.75, rel=1e-12)


def test_gemm_efficiency_interpolates_and_holds_beyond_the_table():
    hw = small_profile(gemm_efficiency_by_tokens={100: 0.5, 300: 0.9})
    assert [hw.gemm_efficiency(m) for m in (1, 100, 200, 300, 5000)] == pytest.approx([0.5, 0.5, 0.7, 0.9, 0.9])
    assert small_profile().gemm_efficiency(7) == 1.0


def test_presets_say_they_are_uncalibrated_and_carry_guessed_physics():
    hw = load_profile("h200")
    assert not hw.calibrated and hw.metadata["calibrated"] == "false"
    assert hw.corun_decode_slowdown > 0 and hw.period_overhead > 0 and hw.gemm_efficiency(256) < 1
    assert small_profile(metadata={"calibrated": "true"}).calibrated


@pytest.mark.parametrize("overrides, match", [
    (dict(corun_decode_slowdown=-0.1), "corun_decode_slowdown"), (dict(period_overhead=float("nan")), "period"),
    (dict(gemm_tile=0), "gemm_tile"), (dict(gemm_efficiency_by_tokens={64: 1.5}), "gemm_efficiency_by_tokens"),
    (dict(gemm_efficiency_by_tokens={0: 0.5}), "gemm_efficiency_by_tokens")])
def test_bad_physics_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        small_profile(**overrides)


def test_with_physics_replaces_fields_and_names_unknown_ones():
    from minidu.scheduler.hardware import with_physics

    hw = with_physics(load_profile("h200"), corun_decode_slowdown=0.3)
    assert hw.corun_decode_slowdown == 0.3 and hw.mem_bandwidth == load_profile("h200").mem_bandwidth
    with pytest.raises(ValueError, match="slowdown"):
        with_physics(hw, slowdown=0.3)


def _as_json(**changes) -> str:
    data = json.loads(small_profile().to_json()) | changes
    return json.dumps({k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (_as_json(peak_flops=None), "incomplete"),
    (_as_json(colour="red"), "unknown keys"),
    (_as_json(flops_by_sms={"two": 1.0}), "flops_by_sms keys"),
    (_as_json(bandwidth_by_sms={"4": -1.0}), "bandwidth_by_sms"),
    (_as_json(flops_by_sms={"11": 1.0}), "flops_by_sms key"),
    (_as_json(flops_by_sms=[1.0]), "flops_by_sms"),
    (_as_json(num_sms="ten"), "num_sms"),
    (_as_json(bandwidth_saturation_sms=11), "bandwidth_saturation_sms"),
    (_as_json(mem_bandwidth=0), "mem_bandwidth"),
    (_as_json(metadata=[]), "metadata"),
])
def test_malformed_json_raises_value_error(text, match):
    with pytest.raises(ValueError, match=match):
        HardwareProfile.from_json(text)


def test_load_profile_errors(tmp_path):
    with pytest.raises(ValueError, match="name_or_path"):
        load_profile("b200")
    with pytest.raises(ValueError, match="name_or_path"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        load_profile(bad)


@pytest.mark.parametrize("num_sms", [0, 11, 2.0, True])
def test_budget_out_of_range_raises(num_sms):
    hw = small_profile()
    with pytest.raises(ValueError, match="num_sms"):
        hw.compute(num_sms)
    with pytest.raises(ValueError, match="num_sms"):
        hw.bandwidth(num_sms)


tables = st.dictionaries(st.integers(1, 64), st.floats(1e9, 1e15), max_size=6)


@given(flops=tables, bandwidth=tables, saturation=st.integers(1, 64))
def test_throughput_never_drops_with_more_sms(flops, bandwidth, saturation):
    hw = small_profile(num_sms=64, bandwidth_saturation_sms=saturation, flops_by_sms=flops,
                       bandwidth_by_sms=bandwidth)
    compute = [hw.compute(s) for s in range(1, 65)]
    bw = [hw.bandwidth(s) for s in range(1, 65)]
    for series in (compute, bw):
        assert all(v > 0 for v in series)
        assert all(a <= b * (1 + 1e-12) for a, b in zip(series, series[1:]))
    for s, value in flops.items():  # measured points are reproduced unless a smaller budget measured more
        assert hw.compute(s) == pytest.approx(max(v for t, v in flops.items() if t <= s), rel=1e-12)


def test_ring_collectives_over_the_interconnect():
    hw = small_profile(interconnect_bandwidth=1e9, interconnect_latency=2e-6)
    # A ring all-reduce is a reduce-scatter and an all-gather, each sending (N-1)/N of the buffer through each link.
    assert hw.all_reduce_time(4e6, 4) == pytest.approx(2 * 3 / 4 * 4e6 / 1e9 + 2e-6, rel=1e-12)
    assert hw.all_gather_time(4e6, 2) == pytest.approx(1 / 2 * 4e6 / 1e9 + 2e-6, rel=1e-12)
    assert hw.all_reduce_time(4e6, 1) == hw.all_gather_time(4e6, 1) == 0.0
    with pytest.raises(ValueError, match="interconnect_bandwidth of hardware 'toy' is unknown"):
        small_profile().all_reduce_time(4e6, 2)
    with pytest.raises(ValueError, match="ranks"):
        hw.all_reduce_time(4e6, 0)


@pytest.mark.parametrize("name, link", [("h100", 450e9), ("h200", 450e9), ("a100", 300e9)])
def test_presets_carry_nvlink(name, link):
    hw = load_profile(name)
    assert 0.6 * link <= hw.interconnect_bandwidth <= link
    assert 0 < hw.interconnect_latency < 20e-6


@pytest.mark.parametrize("field_name", ["interconnect_bandwidth", "interconnect_latency"])
@pytest.mark.parametrize("value", [-1.0, float("inf"), True, "1"])
def test_bad_interconnect_raises(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        small_profile(**{field_name: value})


def test_interconnect_survives_json():
    hw = small_profile(interconnect_bandwidth=3e11, interconnect_latency=4e-6)
    assert HardwareProfile.from_json(hw.to_json()) == hw
    assert HardwareProfile("toy", 10, 1.0, 1.0, 4).interconnect_bandwidth == 0.0  # positional callers unchanged
