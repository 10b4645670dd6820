"""Synthetic and trace-driven serving workloads: when each request arrives and how many tokens it reads and writes,
deterministic given a seed, for benchmarks that replay them against an engine."""
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(slots=True)
class RequestSpec:
    arrival_time: float  # seconds after the start of the run
    input_len: int
    output_len: int


@dataclass(frozen=True, slots=True)
class LengthShape:
    """A lognormal with this mean and log-space sigma, clipped to [low, high] (clipping moves the mean by a few %)."""

    mean: float
    sigma: float
    low: int
    high: int


# Shapes of the production traces DuetServe evaluates on, rebuilt from published statistics rather than downloaded.
# Azure LLM inference traces 2023 (Splitwise, Patel et al. 2024): coding prompts have a median of ~1.5k tokens and a
# long tail (mean ~2k) with very short outputs (median ~13, mean ~20); conversation prompts ~1k tokens with outputs
# around 130. Mooncake's conversation trace (Qin et al. 2024) has long multi-turn contexts averaging ~8k tokens
# (up to tens of thousands) and outputs around 200. The sigmas give the heavy right tails of those histograms.
TRACE_SHAPES: dict[str, tuple[LengthShape, LengthShape]] = {  # name -> (input, output)
    "azure-code": (LengthShape(2048, 0.8, 16, 8192), LengthShape(20, 0.9, 1, 256)),
    "azure-conv": (LengthShape(1024, 0.6, 16, 8192), LengthShape(130, 0.7, 1, 1024)),
    "mooncake": (LengthShape(10000, 0.5, 1024, 32768), LengthShape(200, 0.6, 8, 1024)),
}
WORKLOADS = ("fixed", "random", *TRACE_SHAPES)


def arrival_times(num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival times of a renewal process at `rate` requests/s whose gaps are Gamma(shape=burstiness, mean=1/rate),
    as vLLM's benchmark draws them: burstiness 1 is Poisson, < 1 burstier, > 1 more regular. rate=inf: all at 0."""
    _check_count("num_requests", num_requests)
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf: all at once), got {rate!r}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness!r}")
    if math.isinf(rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng([seed, 1]).gamma(burstiness, 1.0 / (rate * burstiness), num_requests)
    return np.cumsum(gaps).tolist()


def random_lengths(num_requests: int, mean: int, range_ratio: float, seed: int, stream: int = 0) -> list[int]:
    """Integers uniform in [mean * (1 - range_ratio), mean * (1 + range_ratio)], at least 1 (vLLM's random dataset)."""
    _check_count("num_requests", num_requests)
    _check_count("mean", mean)
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio!r}")
    low, high = max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio)))
    return np.random.default_rng([seed, 2, stream]).integers(low, high + 1, num_requests).tolist()


def shaped_lengths(num_requests: int, shape: LengthShape, seed: int, stream: int = 0) -> list[int]:
    """Lengths from a clipped lognormal whose unclipped mean is `shape.mean`."""
    mu = math.log(shape.mean) - shape.sigma ** 2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    draws = np.random.default_rng([seed, 3, stream]).lognormal(mu, shape.sigma, num_requests)
    return np.clip(np.rint(draws), shape.low, shape.high).astype(int).tolist()


def synthetic_workload(name: str, num_requests: int, rate: float, *, burstiness: float = 1.0, seed: int = 0,
                       input_len: int = 1024, output_len: int = 128, range_ratio: float = 0.5) -> list[RequestSpec]:
    """`num_requests` requests of workload `name` (see WORKLOADS) arriving at `rate` req/s; `input_len`, `output_len`
    and `range_ratio` only apply to "fixed" and "random"."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {list(WORKLOADS)}, got {name!r}")
    _check_count("num_requests", num_requests)
    if name == "fixed":
        _check_count("input_len", input_len)
        _check_count("output_len", output_len)
        inputs, outputs = [input_len] * num_requests, [output_len] * num_requests
    elif name == "random":
        inputs = random_lengths(num_requests, input_len, range_ratio, seed, stream=0)
        outputs = random_lengths(num_requests, output_len, range_ratio, seed, stream=1)
    else:
        input_shape, output_shape = TRACE_SHAPES[name]
        inputs = shaped_lengths(num_requests, input_shape, seed, stream=0)
        outputs = shaped_lengths(num_requests, output_shape, seed, stream=1)
    times = arrival_times(num_requests, rate, burstiness, seed)
    return [RequestSpec(t, i, o) for t, i, o in zip(times, inputs, outputs)]


TRACE_COLUMNS = ("timestamp", "input_len", "output_len")


def load_trace(path: str | Path, num_requests: int | None = None) -> list[RequestSpec]:
    """Requests from a CSV with a header naming the columns timestamp (seconds, non-decreasing), input_len and
    output_len (ints >= 1); arrival times are shifted so the first request arrives at 0. Reads the first
    `num_requests` rows (all when None). Errors name the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {str(path)!r} is not a file")
    if num_requests is not None:
        _check_count("num_requests", num_requests)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if missing := [c for c in TRACE_COLUMNS if c not in header]:
            raise ValueError(f"{path}: missing column(s) {missing}; the header must name {list(TRACE_COLUMNS)}, "
                             f"got {header}")
        reader.fieldnames = header
        specs: list[RequestSpec] = []
        for row in reader:
            if num_requests is not None and len(specs) == num_requests:
                break
            specs.append(_parse_row(path, reader.line_num, row, specs[-1].arrival_time if specs else None))
    if not specs:
        raise ValueError(f"{path}: the trace has no requests")
    start = specs[0].arrival_time
    for spec in specs:
        spec.arrival_time -= start
    return specs


def _parse_row(path: Path, line: int, row: dict, previous: float | None) -> RequestSpec:
    values = {}
    for column, kind in zip(TRACE_COLUMNS, (float, int, int)):
        text = (row.get(column) or "").strip()
        try:
            values[column] = kind(text)
        except ValueError:
            expected = "a number" if kind is float else "an int"
            raise ValueError(f"{path}, line {line}, column {column}: expected {expected}, got {text!r}") from None
    t = values["timestamp"]
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{path}, line {line}, column timestamp: must be a finite number >= 0, got {t}")
    if previous is not None and t < previous:
        raise ValueError(f"{path}, line {line}, column timestamp: {t} is before the previous row's {previous}; "
                         f"sort the trace by timestamp")
    for column in ("input_len", "output_len"):
        if values[column] < 1:
            raise ValueError(f"{path}, line {line}, column {column}: must be >= 1, got {values[column]}")
    return RequestSpec(t, values["input_len"], values["output_len"])


def prompt_token_ids(input_len: int, vocab_size: int, seed: int, index: int) -> list[int]:
    """Request `index`'s prompt: `input_len` ids uniform in [0, vocab_size), reproducible from (seed, index) alone so
    prompts can be drawn when their request arrives, and distinct across requests (no prefix-cache hits)."""
    _check_count("input_len", input_len)
    _check_count("vocab_size", vocab_size)
    return np.random.default_rng([seed, 4, index]).integers(0, vocab_size, input_len).tolist()


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
