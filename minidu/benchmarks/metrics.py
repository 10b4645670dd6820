"""Serving metrics of a finished run: latency percentiles, throughput, and SLO attainment and goodput as DuetServe
reports them. Pure functions over RequestOutputs (times in seconds on one clock); reported latencies are in ms."""
import math
from collections.abc import Sequence

import numpy as np

from minidu.outputs import RequestOutput

MODES = ("aggregated", "multiplexed")


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90 and p99 (linear interpolation between order statistics, numpy's default); None when empty."""
    if len(values) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def token_gaps(token_times: Sequence[float]) -> list[float]:
    """Seconds between consecutive tokens of one request (its time-between-tokens samples)."""
    return [b - a for a, b in zip(token_times, token_times[1:])]


def completed(output: RequestOutput) -> bool:
    """The request ran and produced tokens (a rejected or aborted one did not)."""
    return output.finished and output.finish_reason != "abort" and output.first_token_time is not None


def meets_slo(output: RequestOutput, ttft_slo: float, tbt_slo: float) -> bool:
    """TTFT <= `ttft_slo` and the p99 of the request's own token gaps <= `tbt_slo` (seconds). A one-token request
    has no gaps and is judged on its TTFT alone; a request that did not complete fails."""
    if not completed(output) or output.ttft > ttft_slo:
        return False
    gaps = token_gaps(output.token_times)
    return not gaps or float(np.percentile(gaps, 99)) <= tbt_slo


def steady_state(outputs: Sequence[RequestOutput], warmup: float, drain: float) -> list[RequestOutput]:
    """The requests that arrived after the first `warmup` and before the last `drain` fractions of all arrivals (by
    arrival order): a queue's fill-up and its emptying after the last arrival are transients, not the steady state."""
    if not (0 <= warmup and 0 <= drain and warmup + drain < 1):
        raise ValueError(f"warmup and drain must be >= 0 with warmup + drain < 1, got {warmup} and {drain}")
    ordered = sorted(outputs, key=lambda o: o.arrival_time)
    first, last = math.floor(warmup * len(ordered)), len(ordered) - math.floor(drain * len(ordered))
    return ordered[first:last]


def tracks_rate(outputs: Sequence[RequestOutput], window: Sequence[RequestOutput], tolerance: float = 0.1) -> bool:
    """Whether the server kept up with the offered load over `window` (a steady_state slice of `outputs`): between
    the window's first and last arrival, at least (1 - tolerance) times as many requests (of all `outputs`) completed
    as arrived after the first (one per inter-arrival gap). A queue that grows without bound fails, however well its
    first requests were served."""
    if len(window) < 2:
        raise ValueError("window needs at least 2 requests")
    start, end = window[0].arrival_time, window[-1].arrival_time
    finished = sum(completed(o) and start <= o.token_times[-1] <= end for o in outputs)
    return finished >= (1 - tolerance) * (len(window) - 1)


def mode_fraction(modes: Sequence[str], weights: Sequence[float] | None = None) -> dict[str, float]:
    """Share of steps (or of `weights`, e.g. their durations) run in each mode; all 0 when there are none."""
    if weights is None:
        weights = [1.0] * len(modes)
    if len(weights) != len(modes):
        raise ValueError(f"weights has {len(weights)} entries for {len(modes)} modes")
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"modes must be in {MODES}, got {sorted(unknown)}")
    total = math.fsum(weights)
    return {m: math.fsum(w for x, w in zip(modes, weights) if x == m) / total if total else 0.0 for m in MODES}


def serving_metrics(outputs: Sequence[RequestOutput], modes: Sequence[str], *, ttft_slo_ms: float, tbt_slo_ms: float,
                    policy: str | None = None, workload: str | None = None, rate: float | None = None,
                    step_durations: Sequence[float] | None = None,
                    step_predictions: Sequence[float | None] | None = None) -> dict:
    """The metrics of a run: `outputs` are the finished requests, `modes` each engine step's mode.

    duration_s spans the first arrival to the last token; throughputs and goodput (requests meeting both SLOs per
    second) divide by it. ttft_ms pools completed requests; tbt_ms pools every gap between consecutive tokens of all
    requests (vLLM's ITL), while slo_attainment judges each request by its own p99 gap.
    """
    if not outputs:
        raise ValueError("outputs is empty: no request finished")
    if not (ttft_slo_ms > 0 and tbt_slo_ms > 0):
        raise ValueError(f"ttft_slo_ms and tbt_slo_ms must be > 0, got {ttft_slo_ms} and {tbt_slo_ms}")
    done = [o for o in outputs if completed(o)]
    start = min(o.arrival_time for o in outputs)
    end = max([o.token_times[-1] for o in done], default=start)
    duration = end - start
    good = sum(meets_slo(o, ttft_slo_ms / 1e3, tbt_slo_ms / 1e3) for o in outputs)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    return {
        "policy": policy, "workload": workload, "rate": rate,
        "num_requests": len(outputs), "num_completed": len(done), "duration_s": duration,
        "throughput_req_s": per_s(len(done)), "output_tok_s": per_s(sum(len(o.token_ids) for o in done)),
        "ttft_ms": _ms(summarize([o.ttft for o in done])),
        "tbt_ms": _ms(summarize([g for o in done for g in token_gaps(o.token_times)])),
        "ttft_slo_ms": ttft_slo_ms, "tbt_slo_ms": tbt_slo_ms,
        "slo_attainment": good / len(outputs), "goodput_req_s": per_s(good),
        "mode_fraction": mode_fraction(modes),
        "mode_time_fraction": mode_fraction(modes, step_durations) if step_durations is not None else None,
        "latency_model_error": prediction_error(step_durations, step_predictions),
    }


def prediction_error(measured: Sequence[float] | None, predicted: Sequence[float | None] | None) -> dict | None:
    """Median, p90 and mean of |predicted - measured| / measured over the steps that have both (None if none do)."""
    if measured is None or predicted is None:
        return None
    errors = [abs(p - m) / m for m, p in zip(measured, predicted) if p is not None and m > 0]
    if not errors:
        return None
    stats = summarize(errors)
    return {"median": stats["p50"], "p90": stats["p90"], "mean": stats["mean"], "num_steps": len(errors)}


# Step kinds of the latency-model error report: the parts StepRecord.parts names, as the literature reports them.
STEP_KINDS = {"aggregated": "aggregated", "prefill": "multiplexed prefill", "decode": "multiplexed decode"}


def prediction_error_by_kind(parts: Sequence[tuple[str, int, float, float]]) -> dict[str, dict | None]:
    """prediction_error of each step kind over (kind, SM budget, predicted s, measured s) parts of a run's steps."""
    unknown = {p[0] for p in parts} - set(STEP_KINDS)
    if unknown:
        raise ValueError(f"step kinds must be in {sorted(STEP_KINDS)}, got {sorted(unknown)}")
    return {label: prediction_error([p[3] for p in parts if p[0] == kind], [p[2] for p in parts if p[0] == kind])
            for kind, label in STEP_KINDS.items()}


def _ms(stats: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else v * 1e3 for k, v in stats.items()}
