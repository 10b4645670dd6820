"""Fits the latency model's multiplexing physics from GPU measurements (scripts/calibrate_hw.py measures, this turns
measurements into HardwareProfile fields): GEMM efficiency by row count, decode's co-run slowdown beside prefill."""
import math

from minidu.scheduler.hardware import HardwareProfile

# The bandwidth curve saturates at the first budget within this fraction of the best measured bandwidth.
SATURATION_FRACTION = 0.95


def build_profile(name: str, num_sms: int, flops_by_sms: dict[int, float], bandwidth_by_sms: dict[int, float],
                  layer_overhead: float, memory_bytes: float, metadata: dict[str, str]) -> HardwareProfile:
    """A profile from measured tables: its peaks are the best measurements and its saturation point the first budget
    within SATURATION_FRACTION of the best bandwidth."""
    best_bandwidth = max(bandwidth_by_sms.values())
    saturation = min(s for s, bw in bandwidth_by_sms.items() if bw >= SATURATION_FRACTION * best_bandwidth)
    return HardwareProfile(name, num_sms, max(flops_by_sms.values()), best_bandwidth, saturation,
                           layer_overhead=layer_overhead, memory_bytes=memory_bytes, flops_by_sms=flops_by_sms,
                           bandwidth_by_sms=bandwidth_by_sms, metadata=metadata)


def fit_gemm_efficiency(hw: HardwareProfile, n: int, k: int, num_sms: int, seconds_by_tokens: dict[int, float],
                        dtype_bytes: int = 2) -> dict[int, float]:
    """gemm_efficiency_by_tokens from measured seconds of an [m, k] x [n, k]^T GEMM on `num_sms` SMs at several m:
    the measured FLOP rate over compute(S) times the wave efficiency the model already applies, capped at 1. Row
    counts at which the GEMM ran no slower than its bandwidth bound are memory-bound and say nothing of compute:
    they are left out (the model then holds the nearest fitted value)."""
    table = {}
    for m, seconds in sorted(seconds_by_tokens.items()):
        if seconds <= 0:
            raise ValueError(f"seconds_by_tokens[{m}] must be > 0, got {seconds!r}")
        tiles = math.ceil(m / hw.gemm_tile) * math.ceil(n / hw.gemm_tile)
        loaders = min(num_sms, tiles)
        memory_bound = dtype_bytes * (n * k + m * k + m * n) / hw.bandwidth(loaders)
        if seconds <= 1.05 * memory_bound:
            continue
        wave = tiles / (math.ceil(tiles / num_sms) * num_sms)
        table[m] = min(1.0, 2.0 * m * n * k / seconds / (hw.compute(num_sms) * wave))
    return table


def fit_corun_slowdown(hw: HardwareProfile, runs: list[tuple[float, float, float, float, float, float]]) -> float:
    """corun_decode_slowdown from isolation runs, each (decode bytes, decode seconds alone, decode seconds beside
    prefill, prefill bytes, prefill seconds alone, prefill seconds beside): the median over runs of how much slower
    decode ran beside prefill than bandwidth sharing alone explains (the model applies the sharing itself)."""
    if not runs:
        raise ValueError("runs is empty")
    slowdowns = []
    for d_bytes, d_alone, d_beside, p_bytes, p_alone, _ in runs:
        if min(d_alone, d_beside, p_alone) <= 0:
            raise ValueError(f"isolation run times must be > 0, got {(d_alone, d_beside, p_alone)}")
        share = min(1.0, hw.mem_bandwidth / (d_bytes / d_alone + p_bytes / p_alone))
        slowdowns.append(max(0.0, d_beside * share / d_alone - 1))
    slowdowns.sort()
    middle = len(slowdowns) // 2
    return slowdowns[middle] if len(slowdowns) % 2 else (slowdowns[middle - 1] + slowdowns[middle]) / 2
