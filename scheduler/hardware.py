"""GPU throughput as a function of the SM budget: the compute and memory-bandwidth ceilings that the latency model's
roofline uses, from datasheet-style presets or from tables measured by scripts/calibrate_hw.py."""
import bisect
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass(slots=True)
class HardwareProfile:
    """Achievable throughput of one GPU when a kernel may use `S` of its `num_sms` SMs.

    Without measured tables, compute scales linearly in S (every SM has the same tensor cores) and bandwidth follows
    bw(S) = mem_bandwidth * min(1, S / bandwidth_saturation_sms): each SM's load units add a fixed share until HBM
    saturates, which takes only a fraction of the SMs. The piecewise-linear knee (rather than a smooth 1 - exp) matches
    the shape of measured tables and makes the crossover explicit. With `flops_by_sms` / `bandwidth_by_sms` (budget ->
    measured FLOP/s or B/s), values are interpolated linearly between budgets, scaled from the origin below the smallest
    measured budget and held above the largest; a running maximum over budgets removes measurement noise so that more
    SMs never predict less throughput (the partition optimizer relies on that monotonicity).
    """

    name: str
    num_sms: int
    peak_flops: float  # FLOP/s with all SMs, model dtype (bf16) dense
    mem_bandwidth: float  # B/s once bandwidth saturates
    bandwidth_saturation_sms: int  # smallest budget that reaches mem_bandwidth
    memory_bytes: float = field(default=0.0, kw_only=True)  # device memory, sizes a simulated KV cache (0: unknown)
    # GPU-to-GPU link for tensor parallelism's collectives: bytes/s each GPU sends (and receives) at once in a ring
    # (NVLink's per-direction bandwidth, 0: unknown, refused for tensor_parallel_size > 1), and the fixed seconds of
    # one collective (launch and the ring's synchronisation), whatever its size.
    interconnect_bandwidth: float = field(default=0.0, kw_only=True)
    interconnect_latency: float = field(default=0.0, kw_only=True)
    # Seconds per decoder layer per step that the roofline misses: launch gaps between the layer's ~10 kernels and the
    # partial last wave of each. 20 us/layer is ~2 us/kernel, typical of back-to-back launches on Hopper.
    layer_overhead: float = 20e-6
    # Multiplexing physics (DuetServe's isolation is not free): a decode step beside a prefill step runs this fraction
    # slower (L2 and scheduler contention, measured by the isolation benchmark), on top of the two partitions sharing
    # mem_bandwidth; each multiplexed period pays `period_overhead` seconds (two streams' launches, their join and the
    # one host sync).
    corun_decode_slowdown: float = 0.0
    period_overhead: float = 0.0
    # GEMM tile edge used for wave quantisation: a GEMM of ceil(m/t) * ceil(n/t) tiles on S programs runs in whole
    # waves, and a memory-bound one keeps at most that many programs loading.
    gemm_tile: int = 128
    # FLOP/s fraction that a GEMM with m rows reaches of the large-GEMM rate (tokens -> fraction, interpolated,
    # held beyond the ends): mid-size GEMMs pipeline worse than the 8k-row GEMMs that calibrate flops_by_sms.
    gemm_efficiency_by_tokens: dict[int, float] = field(default_factory=dict)
    flops_by_sms: dict[int, float] = field(default_factory=dict)
    bandwidth_by_sms: dict[int, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # provenance (GPU name, date, versions) from calibration
    _flops_points: tuple[tuple[int, ...], tuple[float, ...]] = field(init=False, repr=False, compare=False)
    _bandwidth_points: tuple[tuple[int, ...], tuple[float, ...]] = field(init=False, repr=False, compare=False)
    _gemm_points: tuple[tuple[int, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        _check_int("num_sms", self.num_sms, 1, None)
        _check_positive("peak_flops", self.peak_flops)
        _check_positive("mem_bandwidth", self.mem_bandwidth)
        _check_int("bandwidth_saturation_sms", self.bandwidth_saturation_sms, 1, self.num_sms)
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int | float) \
                or not math.isfinite(self.memory_bytes) or self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must be a finite number >= 0, got {self.memory_bytes!r}")
        for name in ("interconnect_bandwidth", "interconnect_latency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.layer_overhead, int | float) or not math.isfinite(self.layer_overhead) \
                or self.layer_overhead < 0:
            raise ValueError(f"layer_overhead must be a finite number >= 0, got {self.layer_overhead!r}")
        for name in ("corun_decode_slowdown", "period_overhead"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        _check_int("gemm_tile", self.gemm_tile, 1, None)
        for m, value in self.gemm_efficiency_by_tokens.items():
            _check_int("gemm_efficiency_by_tokens key", m, 1, None)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ValueError(f"gemm_efficiency_by_tokens[{m}] must be in (0, 1], got {value!r}")
        self._gemm_points = tuple(sorted(self.gemm_efficiency_by_tokens.items()))
        self._flops_points = _monotone_points("flops_by_sms", self.flops_by_sms, self.num_sms)
        self._bandwidth_points = _monotone_points("bandwidth_by_sms", self.bandwidth_by_sms, self.num_sms)

    def compute(self, num_sms: int) -> float:
        """FLOP/s achievable by a kernel confined to `num_sms` SMs."""
        _check_int("num_sms", num_sms, 1, self.num_sms)
        if self.flops_by_sms:
            return _interpolate(self._flops_points, num_sms)
        return self.peak_flops * num_sms / self.num_sms

    def bandwidth(self, num_sms: int) -> float:
        """HBM bytes/s achievable by a kernel confined to `num_sms` SMs."""
        _check_int("num_sms", num_sms, 1, self.num_sms)
        if self.bandwidth_by_sms:
            return _interpolate(self._bandwidth_points, num_sms)
        return self.mem_bandwidth * min(1.0, num_sms / self.bandwidth_saturation_sms)

    def gemm_efficiency(self, tokens: int) -> float:
        """Fraction of compute(S) that a GEMM over `tokens` rows reaches (1 without a table)."""
        points = self._gemm_points
        if not points:
            return 1.0
        i = bisect.bisect_left(points, (tokens, 0.0))
        if i == len(points):
            return points[-1][1]
        if i == 0 or points[i][0] == tokens:
            return points[i][1]
        (m0, e0), (m1, e1) = points[i - 1], points[i]
        return e0 + (e1 - e0) * (tokens - m0) / (m1 - m0)

    def all_reduce_time(self, nbytes: float, ranks: int) -> float:
        """Seconds of a ring all-reduce of `nbytes` (each rank's buffer) over `ranks` GPUs: reduce-scatter then
        all-gather, each moving (ranks - 1) / ranks of the buffer through every GPU's link; 0 on one GPU."""
        return self._ring_time(2 * nbytes, ranks)

    def all_gather_time(self, nbytes: float, ranks: int) -> float:
        """Seconds of a ring all-gather whose gathered result is `nbytes` on each of `ranks` GPUs; 0 on one GPU."""
        return self._ring_time(nbytes, ranks)

    def _ring_time(self, nbytes: float, ranks: int) -> float:
        _check_int("ranks", ranks, 1, None)
        if ranks == 1:
            return 0.0
        if not self.interconnect_bandwidth:
            raise ValueError(f"the interconnect_bandwidth of hardware {self.name!r} is unknown, and {ranks} ranks "
                             f"exchange data over it: give the profile an interconnect_bandwidth")
        return (ranks - 1) / ranks * nbytes / self.interconnect_bandwidth + self.interconnect_latency

    @property
    def calibrated(self) -> bool:
        """Whether the profile was measured (scripts/calibrate_hw.py) rather than taken from a datasheet preset."""
        return self.metadata.get("calibrated") == "true"

    def to_json(self) -> str:
        """The profile as a JSON object (table keys become strings, as JSON requires)."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.init}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "HardwareProfile":
        """Parses `to_json` output; ValueError naming the problem for malformed input."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"hardware profile is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"hardware profile must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"hardware profile has unknown keys {unknown}; expected a subset of {sorted(known)}")
        for key in ("flops_by_sms", "bandwidth_by_sms", "gemm_efficiency_by_tokens"):
            if key in data:
                data[key] = _parse_table(key, data[key])
        if "metadata" in data and not isinstance(data["metadata"], dict):
            raise ValueError("hardware profile metadata must be a JSON object")
        try:
            return cls(**data)
        except TypeError as e:  # a required key is missing
            raise ValueError(f"hardware profile is incomplete: {e}") from None


# Achievable fractions of the datasheet: on an H200, a large bf16 GEMM reaches ~790e12 FLOP/s of the 989e12 dense peak
# (0.8) and a device-to-device copy ~4.3e12 of the 4.8e12 B/s (0.9). The same fractions are applied to every preset;
# a calibrated JSON profile replaces them with measured tables.
COMPUTE_EFFICIENCY = 0.8
BANDWIDTH_EFFICIENCY = 0.9
# NCCL's ring all-reduce on NVLink reaches about 80% of the link's per-direction bandwidth as bus bandwidth at large
# messages (a guess in line with nccl-tests reports, not measured here); each collective costs ~5 us more whatever
# its size (launch and ring synchronisation, the small-message floor of NVLink all-reduces).
INTERCONNECT_EFFICIENCY = 0.8
PRESET_INTERCONNECT_LATENCY = 5e-6


# Uncalibrated guesses for the multiplexing physics, used until a profile measures them: decode beside prefill 10%
# slower (the low end of the 10-30% co-run slowdowns reported for spatially shared GPUs), 150 us per period (two
# streams' launches, an event join, one host sync), and mid-size GEMMs 20-45% below the large-GEMM rate (Vidur's
# H100 operator profiles at 128-512 tokens).
PRESET_CORUN_DECODE_SLOWDOWN = 0.1
PRESET_PERIOD_OVERHEAD = 150e-6
PRESET_GEMM_EFFICIENCY = {64: 0.5, 128: 0.55, 256: 0.65, 512: 0.8, 1024: 0.9, 2048: 0.95, 4096: 1.0}


def _preset(name: str, num_sms: int, datasheet_flops: float, datasheet_bandwidth: float, memory_bytes: float,
            link_bandwidth: float) -> HardwareProfile:
    # HBM saturates with ~40% of the SMs (measured knees on Hopper sit between 1/3 and 1/2 of the SMs).
    return HardwareProfile(name, num_sms, datasheet_flops * COMPUTE_EFFICIENCY,
                           datasheet_bandwidth * BANDWIDTH_EFFICIENCY, math.ceil(0.4 * num_sms), memory_bytes=memory_bytes,
                           interconnect_bandwidth=link_bandwidth * INTERCONNECT_EFFICIENCY,
                           interconnect_latency=PRESET_INTERCONNECT_LATENCY,
                           corun_decode_slowdown=PRESET_CORUN_DECODE_SLOWDOWN, period_overhead=PRESET_PERIOD_OVERHEAD,
                           gemm_efficiency_by_tokens=dict(PRESET_GEMM_EFFICIENCY),
                           metadata={"calibrated": "false", "source": "datasheet preset with guessed efficiencies"})


# name -> (SMs, datasheet bf16 dense FLOP/s, datasheet HBM B/s, HBM bytes, NVLink B/s per direction per GPU)
HARDWARE_PRESETS: dict[str, tuple[int, float, float, float, float]] = {
    "h100": (132, 989e12, 3.35e12, 80e9, 450e9),  # H100 SXM, NVLink 4 (900 GB/s both directions)
    "h200": (132, 989e12, 4.8e12, 141e9, 450e9),
    "a100": (108, 312e12, 2.0e12, 80e9, 300e9),  # A100 SXM 80GB, NVLink 3 (600 GB/s both directions)
}


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A preset by name (case-insensitive: h100, h200, a100) or a JSON profile written by scripts/calibrate_hw.py."""
    if isinstance(name_or_path, str) and name_or_path.lower() in HARDWARE_PRESETS:
        return _preset(name_or_path.lower(), *HARDWARE_PRESETS[name_or_path.lower()])
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"name_or_path {str(name_or_path)!r} is neither a hardware preset {sorted(HARDWARE_PRESETS)} "
                         f"nor a profile JSON file")
    try:
        return HardwareProfile.from_json(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _check_int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def with_physics(hw: HardwareProfile, **overrides) -> HardwareProfile:
    """A copy of `hw` with some fields replaced (e.g. a simulator's ground truth that differs from the planner's)."""
    data = {f.name: getattr(hw, f.name) for f in fields(hw) if f.init}
    if unknown := sorted(set(overrides) - set(data)):
        raise ValueError(f"unknown hardware profile fields {unknown}")
    return HardwareProfile(**(data | overrides))


def _parse_table(name: str, table) -> dict[int, float]:
    if not isinstance(table, dict):
        raise ValueError(f"{name} must be a JSON object mapping SM counts to values")
    try:
        return {int(k): v for k, v in table.items()}
    except ValueError:
        raise ValueError(f"{name} keys must be integer SM counts, got {sorted(table)}") from None


def _monotone_points(name: str, table: dict[int, float], num_sms: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Sorted (budgets, running-max values) of a measured table."""
    for sms, value in table.items():
        _check_int(f"{name} key", sms, 1, num_sms)
        _check_positive(f"{name}[{sms}]", value)
    budgets = tuple(sorted(table))
    values, best = [], 0.0
    for sms in budgets:
        best = max(best, float(table[sms]))
        values.append(best)
    return budgets, tuple(values)


def _interpolate(points: tuple[tuple[int, ...], tuple[float, ...]], num_sms: int) -> float:
    budgets, values = points
    i = bisect.bisect_left(budgets, num_sms)
    if i == len(budgets):
        return values[-1]
    if budgets[i] == num_sms:
        return values[i]
    if i == 0:
        return values[0] * num_sms / budgets[0]
    s0, s1, v0, v1 = budgets[i - 1], budgets[i], values[i - 1], values[i]
    return v0 + (v1 - v0) * (num_sms - s0) / (s1 - s0)
