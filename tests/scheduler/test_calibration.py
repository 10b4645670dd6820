"""Fitting the multiplexing physics from measurements, checked against measurements synthesised by hand."""
import math

import pytest

from minidu.scheduler.calibration import build_profile, fit_corun_slowdown, fit_gemm_efficiency
from minidu.scheduler.hardware import HardwareProfile

HW = HardwareProfile("test", 100, 100e12, 1e12, 40, gemm_tile=128)


def test_gemm_efficiency_recovers_the_rate_and_skips_memory_bound_rows():
    n, k = 4096, 4096
    seconds = {}
    for m, eff in ((64, 0.3), (512, 0.6), (4096, 0.9)):
        tiles = math.ceil(m / 128) * 32
        wave = tiles / (math.ceil(tiles / 100) * 100)
        seconds[m] = 2 * m * n * k / (100e12 * eff * wave)
    fitted = fit_gemm_efficiency(HW, n, k, 100, seconds)
    # A run no slower than its weights' load time (32 tiles load at bandwidth(32)) says nothing of compute.
    assert fitted == pytest.approx({64: 0.3, 512: 0.6, 4096: 0.9})
    weights_time = 2 * (n * k + 64 * k + 64 * n) / HW.bandwidth(32)
    assert fit_gemm_efficiency(HW, n, k, 100, {64: weights_time}) == {}


def test_corun_slowdown_is_net_of_bandwidth_sharing():
    # Decode alone demands 0.8e12 B/s, the GEMM 0.4e12: together 1.2x the device, so sharing alone stretches decode
    # by 1.2; a measured 1.2 * 1.15 leaves 15% to the co-run slowdown.
    runs = [(0.8e9, 1e-3, 1e-3 * 1.2 * s, 0.4e9, 1e-3, 1.2e-3) for s in (1.10, 1.15, 1.30)]
    assert fit_corun_slowdown(HW, runs) == pytest.approx(0.15)
    assert fit_corun_slowdown(HW, [(1e3, 1.0, 0.9, 1e3, 1.0, 1.0)]) == 0.0  # never negative
    with pytest.raises(ValueError, match="empty"):
        fit_corun_slowdown(HW, [])


def test_build_profile_reads_its_tables_back():
    flops = {16: 100e12, 66: 390e12, 132: 780e12}
    bandwidth = {16: 1.5e12, 66: 4.1e12, 132: 4.3e12}
    hw = build_profile("h200-measured", 132, flops, bandwidth, 15e-6, 141e9, {"gpu": "NVIDIA H200"})
    assert (hw.peak_flops, hw.mem_bandwidth, hw.memory_bytes, hw.layer_overhead) == (780e12, 4.3e12, 141e9, 15e-6)
    assert hw.bandwidth_saturation_sms == 66  # the first budget within 95% of the best bandwidth
    assert [hw.compute(s) for s in flops] == list(flops.values())
    assert [hw.bandwidth(s) for s in bandwidth] == list(bandwidth.values())
    assert hw.corun_decode_slowdown == 0.0 and hw.metadata["gpu"] == "NVIDIA H200"
