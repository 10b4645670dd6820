"""DuetServe's SM-partition optimizer: decides, each step, whether to run the mixed batch on the whole GPU or to split
the SMs between k decode steps and one prefill step running side by side, using the roofline latency model."""
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from minidu.scheduler.roofline import LatencyModel, StepWork

# A truncated chunk keeps one of this many evenly spaced fractions of its tokens, so the search for the longest chunk
# that fits costs at most log2(TRUNCATION_LEVELS) step-time evaluations per decode budget.
TRUNCATION_LEVELS = 64


@dataclass(frozen=True, slots=True)
class PartitionDecision:
    """What to run next. Aggregated: the decode requests and all chunks as one mixed batch on all `num_sms` SMs (the
    partition fields are 0 and k is 1). Multiplexed: k decode steps on `num_sms_decode` SMs while one prefill step over
    the first `num_prefill_chunks` chunks, the last one cut to `last_chunk_tokens` new tokens, runs on
    `num_sms_prefill` SMs; the period ends when both are done."""

    mode: Literal["aggregated", "multiplexed"]
    num_sms: int
    num_sms_prefill: int
    num_sms_decode: int
    k: int
    num_prefill_chunks: int
    last_chunk_tokens: int  # 0 when no chunk runs
    decode_step_time: float  # predicted seconds per decode step (the whole step when aggregated)
    prefill_time: float  # predicted seconds of the prefill step (the whole step when aggregated)
    predicted_time: float  # seconds of the period: max(k * decode_step_time, prefill_time), or the aggregated step
    predicted_throughput: float  # new tokens per second over the period
    meets_tbt: bool  # the longest predicted gap between two tokens of a decode request is <= tau


def choose_partition(decode_context_lens: Sequence[int], prefill_chunks: Sequence[tuple[int, int]], tau: float,
                     model: LatencyModel, num_sms: int | None = None, *, granularity: int = 2,
                     max_k: int = 8, prefer_tbt: bool = False) -> PartitionDecision:
    """Picks aggregated or multiplexed execution for one step.

    `decode_context_lens`: cached tokens of each decode request (each adds one token); `prefill_chunks`: (new tokens,
    cached tokens) of each candidate chunk in FCFS order, already within the token budget; `tau`: the time-between-
    tokens objective in seconds. If the aggregated step takes at most tau it runs as is. Otherwise the search covers
    decode budgets S_d (multiples of `granularity` in [granularity, num_sms - granularity]) with t_d(S_d) <= tau, the
    prefill partition getting the rest, and FCFS prefixes of the chunks, maximising
    (k * decode tokens + prefill tokens) / max(k * t_d, t_p).

    Throughput as a function of k rises while k * t_d <= t_p (more decode tokens in the same period) and falls after
    (the prefill SMs idle). When t_d meets tau, k = ceil(t_p / t_d): the decode steps cover the prefill, so the last
    decode token lands at the end of the period and the next step's first token follows within its own step time
    (<= tau); with fewer steps the decodes would wait t_p - k * t_d, a gap that the next step then lengthens. So the
    prefill step must fit in max_k * t_d, and a prefix that does not has its last chunk truncated to the longest
    length that does. Without a feasible t_d, floor(t_p / t_d) is also tried (throughput alone decides). If no S_d meets tau, the S_d with the shortest
    decode step is used (best effort, TBT unreachable either way). Multiplexing is returned only when its predicted
    throughput beats the aggregated step's, unless `prefer_tbt` is set: then a multiplexed plan that meets tau wins
    over the aggregated step that does not, whatever its throughput (DuetServe multiplexes whenever aggregated
    execution is predicted to break the TBT objective; the default keeps the throughput guarantee). The two
    partitions are modelled independently: their contention for HBM bandwidth is ignored, which is mild because
    prefill chunks are compute-bound.
    """
    num_sms = _validate(decode_context_lens, prefill_chunks, tau, model, num_sms, granularity, max_k)
    aggregated = _aggregated(decode_context_lens, prefill_chunks, tau, model, num_sms)
    if aggregated.meets_tbt or not decode_context_lens or not prefill_chunks:
        return aggregated
    decode_work = model.work([(1, c) for c in decode_context_lens])
    decode_times = {s: model.time(decode_work, s) for s in range(granularity, num_sms - granularity + 1, granularity)}
    if not decode_times:
        return aggregated
    feasible = [s for s, t in decode_times.items() if t <= tau]
    if not feasible:
        fastest = min(decode_times.values())
        feasible = [min(s for s, t in decode_times.items() if t == fastest)]
    search = _PrefillSearch(model, prefill_chunks)
    best = None
    for s_d in feasible:
        candidate = _best_for_decode_budget(search, len(decode_context_lens), s_d, num_sms - s_d,
                                            decode_times[s_d], tau, max_k, num_sms)
        if candidate and (best is None or candidate.predicted_throughput > best.predicted_throughput):
            best = candidate
    if best is None:
        return aggregated
    if prefer_tbt and best.meets_tbt:
        return best
    return best if best.predicted_throughput > aggregated.predicted_throughput else aggregated


class _PrefillSearch:
    """Step-time evaluations of chunk prefixes, memoised across decode budgets within one call."""

    def __init__(self, model: LatencyModel, chunks: Sequence[tuple[int, int]]):
        self.model = model
        self.chunks = list(chunks)
        self._works: dict[tuple[int, int], StepWork] = {}

    def time(self, n: int, last_tokens: int, num_sms: int) -> float:
        """Seconds for the first n chunks, the n-th cut to `last_tokens` new tokens, on `num_sms` SMs."""
        key = (n, last_tokens)
        if key not in self._works:
            requests = self.chunks[:n - 1] + [(last_tokens, self.chunks[n - 1][1])]
            self._works[key] = self.model.work(requests)
        return self.model.time(self._works[key], num_sms)

    def longest_fitting(self, n: int, num_sms: int, limit: float) -> int:
        """The most new tokens, on a grid of TRUNCATION_LEVELS, of chunk n (after n - 1 full chunks) whose prefill
        step takes at most `limit` seconds; 0 when even the shortest does not fit."""
        q = self.chunks[n - 1][0]
        levels = sorted({math.ceil(j * q / TRUNCATION_LEVELS) for j in range(1, TRUNCATION_LEVELS)} - {q})
        lo, hi = 0, len(levels)  # levels[:lo] fit, levels[hi:] do not
        while lo < hi:
            mid = (lo + hi) // 2
            if self.time(n, levels[mid], num_sms) <= limit:
                lo = mid + 1
            else:
                hi = mid
        return levels[lo - 1] if lo else 0


def _best_for_decode_budget(search: _PrefillSearch, num_decode: int, s_d: int, s_p: int, t_d: float, tau: float,
                            max_k: int, num_sms: int) -> PartitionDecision | None:
    """The highest-throughput FCFS prefix of the chunks and k against decode steps of t_d seconds on s_d SMs."""
    meets_tbt = t_d <= tau
    limit = max_k * t_d if meets_tbt else math.inf
    best = None
    prefill_tokens = 0
    for n, (q, _) in enumerate(search.chunks, start=1):
        last_tokens = q
        t_p = search.time(n, q, s_p)
        if t_p > limit:
            last_tokens = search.longest_fitting(n, s_p, limit)
            if not last_tokens:
                break
            t_p = search.time(n, last_tokens, s_p)
        ratio = t_p / t_d
        ks = {min(max_k, max(1, math.ceil(ratio)))}
        if not meets_tbt:
            ks.add(min(max_k, max(1, math.floor(ratio))))
        for k in sorted(ks):
            period = max(k * t_d, t_p)
            candidate = PartitionDecision("multiplexed", num_sms, s_p, s_d, k, n, last_tokens, t_d, t_p, period,
                                          (k * num_decode + prefill_tokens + last_tokens) / period, meets_tbt)
            if best is None or candidate.predicted_throughput > best.predicted_throughput:
                best = candidate
        if last_tokens < q:
            break
        prefill_tokens += q
    return best


def _aggregated(decode_context_lens: Sequence[int], prefill_chunks: Sequence[tuple[int, int]], tau: float,
                model: LatencyModel, num_sms: int) -> PartitionDecision:
    requests = [(1, c) for c in decode_context_lens] + list(prefill_chunks)
    t = model.step_time(requests, num_sms)
    tokens = sum(q for q, _ in requests)
    return PartitionDecision("aggregated", num_sms, 0, 0, 1, len(prefill_chunks),
                             prefill_chunks[-1][0] if prefill_chunks else 0, t, t, t,
                             tokens / t if tokens else 0.0, t <= tau)


def _validate(decode_context_lens, prefill_chunks, tau, model, num_sms, granularity, max_k) -> int:
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in decode_context_lens):
        raise ValueError(f"decode_context_lens must hold ints >= 0, got {list(decode_context_lens)!r}")
    for chunk in prefill_chunks:
        if (len(chunk) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in chunk)
                or chunk[0] < 1 or chunk[1] < 0):
            raise ValueError(f"prefill_chunks must hold (q >= 1, c >= 0) int pairs, got {chunk!r}")
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number of seconds > 0, got {tau!r}")
    if num_sms is None:
        num_sms = model.hw.num_sms
    for name, value, high in (("num_sms", num_sms, model.hw.num_sms), ("granularity", granularity, None),
                              ("max_k", max_k, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
            raise ValueError(f"{name} must be an int in [1, {high or 'inf'}], got {value!r}")
    return num_sms
