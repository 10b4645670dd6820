"""DuetServe's SM-partition optimizer: decides, each step, whether to run the mixed batch on the whole GPU or to split
the SMs between k decode steps and one prefill step running side by side, using the roofline latency model."""
import math
from collections.abc import Sequence
from dataclasses import dataclass

from minidu.scheduler.correction import StepCorrection
from minidu.scheduler.plan import MultiplexedPlan, ScheduledChunk
from minidu.scheduler.roofline import LatencyModel, StepWork
from minidu.scheduler.sequence import Sequence as Request

# A truncated chunk keeps one of this many evenly spaced fractions of its tokens, so the search for the longest chunk
# that fits costs at most log2(TRUNCATION_LEVELS) step-time evaluations per decode budget.
TRUNCATION_LEVELS = 64


@dataclass(frozen=True, slots=True)
class Split:
    """What a multiplexed plan needs: k decode steps on `num_sms_decode` SMs while one prefill step over the first
    `num_prefill_chunks` chunks, the last one cut to `last_chunk_tokens` new tokens, runs on `num_sms_prefill` SMs."""

    num_sms_prefill: int
    num_sms_decode: int
    k: int
    num_prefill_chunks: int
    last_chunk_tokens: int

    def plan(self, prefill: list[ScheduledChunk], decode: list[ScheduledChunk],
             preempt: tuple[Request, ...] = ()) -> MultiplexedPlan:
        """The plan over a proposal's prefill and decode chunks (the FCFS prefix, its last chunk truncated)."""
        kept = prefill[:self.num_prefill_chunks]
        if kept:
            kept[-1] = kept[-1].truncated(self.last_chunk_tokens)
        return MultiplexedPlan(kept, self.num_sms_prefill, decode, self.num_sms_decode, self.k, preempt)


@dataclass(frozen=True, slots=True)
class PartitionDecision:
    """The optimizer's answer: `split`, or None to run the mixed step aggregated on all `num_sms` SMs; and what the
    latency model predicts for it (the decode step and prefill step times are the whole step's when aggregated)."""

    split: Split | None
    num_sms: int
    decode_step_time: float  # seconds per decode step
    prefill_time: float  # seconds of the prefill step
    predicted_time: float  # seconds of the period (LatencyModel.period_time), or the aggregated step
    predicted_throughput: float  # new tokens per second over the period
    meets_tbt: bool  # the longest predicted gap between two tokens of a decode request is <= tau


def default_decode_sms_choices(num_sms: int) -> tuple[int, ...]:
    """Multiples of 16 SMs (of num_sms // 8 on small GPUs) leaving prefill at least as many: a few budgets only,
    because the model runner captures one CUDA graph per (batch bucket, decode budget)."""
    step = max(1, min(16, num_sms // 8))
    return tuple(range(step, num_sms - step + 1, step))


def choose_partition(decode_context_lens: Sequence[int], prefill_chunks: Sequence[tuple[int, int]], tau: float,
                     model: LatencyModel, num_sms: int | None = None, *,
                     decode_sms_choices: Sequence[int] | None = None, max_k: int = 8, prefer_tbt: bool = False,
                     margin: float = 0.0, correction: StepCorrection | None = None) -> PartitionDecision:
    """Picks aggregated or multiplexed execution for one step.

    `decode_context_lens`: cached tokens of each decode request (each adds one token); `prefill_chunks`: (new tokens,
    cached tokens) of each candidate chunk in FCFS order, already within the token budget; `tau`: the time-between-
    tokens objective in seconds, planned against as tau * (1 - `margin`); `correction` scales each prediction by what
    past steps of its kind and budget measured. If the aggregated step meets the objective it runs as is. Otherwise
    the search covers the decode budgets S_d of `decode_sms_choices` (default_decode_sms_choices) whose decode step
    t_d meets it, the prefill partition getting the rest, and FCFS prefixes of the chunks, maximising
    (k * decode tokens + prefill tokens) / period, the period being max(k * t_d, t_p) plus the multiplexing overhead,
    and t_p, t_d the two partitions' times side by side (shared bandwidth, co-run slowdown).

    Throughput as a function of k rises while k * t_d <= t_p (more decode tokens in the same period) and falls after
    (the prefill SMs idle). When t_d meets tau, k = ceil(t_p / t_d): the decode steps cover the prefill, so the last
    decode token lands at the end of the period and the next step's first token follows within its own step time
    (<= tau); with fewer steps the decodes would wait t_p - k * t_d, a gap that the next step then lengthens. So the
    prefill step must fit in max_k * t_d, and a prefix that does not has its last chunk truncated to the longest
    length that does. Without a feasible t_d, floor(t_p / t_d) is also tried (throughput alone decides). If no S_d
    meets tau, the S_d with the shortest decode step is used (best effort, TBT unreachable either way).
    Multiplexing is returned only when its predicted throughput beats the aggregated step's, unless `prefer_tbt` is
    set: then a multiplexed plan that meets tau wins over the aggregated step that does not, whatever its throughput
    (DuetServe multiplexes whenever aggregated execution is predicted to break the TBT objective; the default keeps
    the throughput guarantee).
    """
    num_sms, choices = _validate(decode_context_lens, prefill_chunks, tau, model, num_sms, decode_sms_choices, max_k,
                                 margin)
    scale = correction.factor if correction is not None else (lambda kind, sms: 1.0)
    tau = tau * (1 - margin)
    aggregated = _aggregated(decode_context_lens, prefill_chunks, tau, model, num_sms, scale)
    if aggregated.meets_tbt or not decode_context_lens or not prefill_chunks or not choices:
        return aggregated
    decode_work = model.work([(1, c) for c in decode_context_lens])
    # Beside prefill, before bandwidth sharing (which each candidate then adds): a lower bound of the decode step.
    slowdown = 1 + model.hw.corun_decode_slowdown
    decode_times = {s: model.time(decode_work, s) * slowdown * scale("decode", s) for s in choices}
    feasible = [s for s, t in decode_times.items() if t <= tau]
    if not feasible:
        fastest = min(decode_times.values())
        feasible = [min(s for s, t in decode_times.items() if t == fastest)]
    best = None
    for s_d in feasible:
        search = _PrefillSearch(model, prefill_chunks, num_sms - s_d, scale("prefill", num_sms - s_d))
        candidate = _best_for_decode_budget(search, decode_work, len(decode_context_lens), s_d,
                                            decode_times[s_d], scale("decode", s_d), tau, max_k, num_sms)
        if candidate and (best is None or candidate.predicted_throughput > best.predicted_throughput):
            best = candidate
    if best is None:
        return aggregated
    if prefer_tbt and best.meets_tbt:
        return best
    return best if best.predicted_throughput > aggregated.predicted_throughput else aggregated


class _PrefillSearch:
    """Prefill-step evaluations of chunk prefixes on `num_sms` SMs (alone, scaled by the correction `scale`)."""

    def __init__(self, model: LatencyModel, chunks: Sequence[tuple[int, int]], num_sms: int, scale: float):
        self.model, self.chunks, self.num_sms, self.scale = model, list(chunks), num_sms, scale
        self._works: dict[tuple[int, int], StepWork] = {}

    def work(self, n: int, last_tokens: int) -> StepWork:
        """The first n chunks, the n-th cut to `last_tokens` new tokens."""
        key = (n, last_tokens)
        if key not in self._works:
            requests = self.chunks[:n - 1] + [(last_tokens, self.chunks[n - 1][1])]
            self._works[key] = self.model.work(requests)
        return self._works[key]

    def time(self, n: int, last_tokens: int) -> float:
        return self.model.time(self.work(n, last_tokens), self.num_sms) * self.scale

    def longest_fitting(self, n: int, limit: float) -> int:
        """The most new tokens, on a grid of TRUNCATION_LEVELS, of chunk n (after n - 1 full chunks) whose prefill
        step takes at most `limit` seconds; 0 when even the shortest does not fit."""
        q = self.chunks[n - 1][0]
        levels = sorted({math.ceil(j * q / TRUNCATION_LEVELS) for j in range(1, TRUNCATION_LEVELS)} - {q})
        lo, hi = 0, len(levels)  # levels[:lo] fit, levels[hi:] do not
        while lo < hi:
            mid = (lo + hi) // 2
            if self.time(n, levels[mid]) <= limit:
                lo = mid + 1
            else:
                hi = mid
        return levels[lo - 1] if lo else 0


def _best_for_decode_budget(search: _PrefillSearch, decode_work: StepWork, num_decode: int, s_d: int,
                            t_d_bound: float, decode_scale: float, tau: float, max_k: int,
                            num_sms: int) -> PartitionDecision | None:
    """The highest-throughput FCFS prefix of the chunks and k against decode steps on s_d SMs (t_d_bound seconds
    before bandwidth sharing)."""
    meets_tbt = t_d_bound <= tau
    limit = max_k * t_d_bound if meets_tbt else math.inf
    model, s_p = search.model, search.num_sms
    best = None
    prefill_tokens = 0
    for n, (q, _) in enumerate(search.chunks, start=1):
        last_tokens = q
        if search.time(n, q) > limit:
            last_tokens = search.longest_fitting(n, limit)
            if not last_tokens:
                break
        t_p, t_d = model.multiplexed_times(search.work(n, last_tokens), s_p, decode_work, s_d)
        t_p, t_d = t_p * search.scale, t_d * decode_scale
        ks = {min(max_k, max(1, math.ceil(t_p / t_d)))}
        if not meets_tbt:
            ks.add(min(max_k, max(1, math.floor(t_p / t_d))))
        # Side by side, the prefill's bandwidth demand may push decode over tau or the prefill past k decode steps.
        for k in sorted(k for k in ks if not meets_tbt or (t_d <= tau and k * t_d >= t_p)):
            period = model.period_time(k, t_d, t_p)
            candidate = PartitionDecision(Split(s_p, s_d, k, n, last_tokens), num_sms, t_d, t_p, period,
                                          (k * num_decode + prefill_tokens + last_tokens) / period, meets_tbt)
            if best is None or candidate.predicted_throughput > best.predicted_throughput:
                best = candidate
        if last_tokens < q:
            break
        prefill_tokens += q
    return best


def _aggregated(decode_context_lens: Sequence[int], prefill_chunks: Sequence[tuple[int, int]], tau: float,
                model: LatencyModel, num_sms: int, scale) -> PartitionDecision:
    requests = [(1, c) for c in decode_context_lens] + list(prefill_chunks)
    t = model.step_time(requests, num_sms) * scale("aggregated", num_sms)
    tokens = sum(q for q, _ in requests)
    return PartitionDecision(None, num_sms, t, t, t, tokens / t if tokens else 0.0, t <= tau)


def _validate(decode_context_lens, prefill_chunks, tau, model, num_sms, decode_sms_choices, max_k,
              margin) -> tuple[int, tuple[int, ...]]:
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in decode_context_lens):
        raise ValueError(f"decode_context_lens must hold ints >= 0, got {list(decode_context_lens)!r}")
    for chunk in prefill_chunks:
        if (len(chunk) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in chunk)
                or chunk[0] < 1 or chunk[1] < 0):
            raise ValueError(f"prefill_chunks must hold (q >= 1, c >= 0) int pairs, got {chunk!r}")
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number of seconds > 0, got {tau!r}")
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
        raise ValueError(f"margin must be a number in [0, 1), got {margin!r}")
    if num_sms is None:
        num_sms = model.hw.num_sms
    for name, value, high in (("num_sms", num_sms, model.hw.num_sms), ("max_k", max_k, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
            raise ValueError(f"{name} must be an int in [1, {high or 'inf'}], got {value!r}")
    return num_sms, check_decode_sms_choices(decode_sms_choices, num_sms)


def check_decode_sms_choices(choices: Sequence[int] | None, num_sms: int) -> tuple[int, ...]:
    """The sorted decode budgets, each leaving prefill at least one SM (default_decode_sms_choices for None)."""
    if choices is None:
        return default_decode_sms_choices(num_sms)
    if not choices or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < num_sms for s in choices):
        raise ValueError(f"decode_sms_choices must be a non-empty set of ints in [1, {num_sms - 1}], "
                         f"got {list(choices)!r}")
    return tuple(sorted(set(choices)))
