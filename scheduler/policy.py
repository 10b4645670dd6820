"""Scheduling policies: how each step of the batcher becomes an execution plan, and on how many SMs.

`aggregated` (vLLM / Sarathi-Serve) mixes decodes and prefill chunks in one step on all SMs; `prefill-first`
(nano-vllm) runs prefill steps alone, never mixed with decodes; `static` always splits the SMs the same way, a stand-in
for disaggregated prefill and decode on one GPU; `duet` (DuetServe) runs aggregated until the latency model predicts
the mixed step would break the TBT objective, then splits the SMs so decode just meets it and prefill gets the rest.
"""
from dataclasses import dataclass, field

from minidu.scheduler.correction import StepCorrection
from minidu.scheduler.partition import check_decode_sms_choices, choose_partition
from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, Plan, ScheduledChunk, StepOutput, plan_times
from minidu.scheduler.roofline import LatencyModel, StepWork
from minidu.scheduler.scheduler import Scheduler

POLICIES = ("aggregated", "prefill-first", "static", "duet")


class AggregatedPolicy:
    name = "aggregated"

    def plan(self, scheduler: Scheduler) -> Plan:
        return scheduler.schedule()


class PrefillFirstPolicy:
    name = "prefill-first"

    def plan(self, scheduler: Scheduler) -> Plan:
        plan = scheduler.schedule(decodes=False)
        return plan if plan.chunks else scheduler.schedule(prefills=False)


def split(plan: AggregatedPlan) -> tuple[list[ScheduledChunk], list[ScheduledChunk]]:
    """(prefill chunks, decode chunks) of an aggregated step."""
    return [c for c in plan.chunks if not c.is_decode], [c for c in plan.chunks if c.is_decode]


def fit_lookahead(scheduler: Scheduler, decode: list[ScheduledChunk], k: int) -> int:
    """The largest k' <= k that the requests can use and the KV pool can hold, with slots reserved for k' steps."""
    cfg, bm = scheduler.config, scheduler.block_manager
    k = min(k, max(c.seq.max_tokens - c.seq.num_output_tokens for c in decode),
            min(cfg.max_model_len - c.seq.num_tokens + 1 for c in decode))
    while k > 1 and sum(bm.blocks_needed(c.start + k) - len(c.seq.block_table) for c in decode) > bm.num_free_blocks:
        k -= 1
    for c in decode:
        scheduler.reserve_lookahead(c, k)
    return k


@dataclass(slots=True)
class StaticPolicy:
    """Always multiplexed: decode on `decode_sms` SMs (one of `decode_sms_choices` when given), prefill on the rest,
    with as many look-ahead decode steps as cover the predicted prefill time."""

    model: LatencyModel
    num_sms: int
    decode_sms: int
    max_k: int = 8
    decode_sms_choices: tuple[int, ...] | None = None
    name: str = "static"

    def __post_init__(self):
        if not 1 <= self.decode_sms < self.num_sms:
            raise ValueError(f"decode_sms must be in [1, {self.num_sms - 1}], got {self.decode_sms}")
        choices = check_decode_sms_choices(self.decode_sms_choices, self.num_sms) if self.decode_sms_choices else None
        if choices and self.decode_sms not in choices:
            raise ValueError(f"decode_sms {self.decode_sms} is not one of decode_sms_choices {list(choices)}")

    def plan(self, scheduler: Scheduler) -> Plan:
        prefill, decode = split(scheduler.schedule())
        prefill_sms = self.num_sms - self.decode_sms
        t_p, t_d = self.model.multiplexed_times(work(self.model, prefill), prefill_sms, work(self.model, decode),
                                                self.decode_sms)
        k = max(1, min(self.max_k, round(t_p / t_d))) if prefill and decode else 1
        k = fit_lookahead(scheduler, decode, k) if decode else 1
        return MultiplexedPlan(prefill, prefill_sms, decode, self.decode_sms, k, self.model.period_time(k, t_d, t_p))


# Planned decode steps leave this fraction of the TBT objective free: the latency model's error on real steps is
# around 10% (Vidur, MuxWise), and a step planned at 0.99 tau that runs 5% slow breaks the objective.
DEFAULT_MARGIN = 0.1


@dataclass(slots=True)
class DuetPolicy:
    """DuetServe: aggregated while the predicted mixed step meets `tbt_slo` seconds, else the partition optimizer's
    split over `decode_sms_choices`. Plans against tbt_slo * (1 - margin), with the model's predictions scaled by
    `correction`, which `observe` updates from each executed step's measured times (None: the model as is)."""

    model: LatencyModel
    num_sms: int
    tbt_slo: float
    max_k: int = 8
    decode_sms_choices: tuple[int, ...] | None = None
    margin: float = DEFAULT_MARGIN
    correction: StepCorrection | None = field(default_factory=StepCorrection)
    name: str = "duet"

    def plan(self, scheduler: Scheduler) -> Plan:
        aggregated = scheduler.schedule()
        prefill, decode = split(aggregated)
        d = choose_partition([c.start for c in decode], [(c.num_new_tokens, c.start) for c in prefill], self.tbt_slo,
                             self.model, self.num_sms, decode_sms_choices=self.decode_sms_choices, max_k=self.max_k,
                             prefer_tbt=True, margin=self.margin, correction=self.correction)
        if d.mode == "aggregated":
            aggregated.predicted_time = d.predicted_time
            return aggregated
        kept = prefill[:d.num_prefill_chunks]
        if kept:
            kept[-1].num_new_tokens = d.last_chunk_tokens
        k = fit_lookahead(scheduler, decode, d.k)
        return MultiplexedPlan(kept, d.num_sms_prefill, decode, d.num_sms_decode, k, d.predicted_time)

    def observe(self, plan: Plan, output: StepOutput, start: float, end: float) -> None:
        """Feeds the correction with the measured times of `plan`, which ran from `start` to `end` (executor clock)."""
        if self.correction is not None:
            for kind, num_sms, predicted, measured in measured_times(self.model, plan, output, start, end,
                                                                     self.num_sms):
                self.correction.observe(kind, num_sms, predicted, measured)


def measured_times(model: LatencyModel, plan: Plan, output: StepOutput, start: float, end: float,
                   num_sms: int) -> list[tuple[str, int, float, float]]:
    """(kind, SM budget, predicted seconds, measured seconds) of each part of an executed plan that its token times
    reveal: an aggregated step is its span; a decode step is the span of its first request's k tokens over k; the
    prefill step is the time of its first sampled token, else the whole period when the prefill was predicted to be
    the period's critical path (the rest of the time the decode steps hide it)."""
    t_p, t_d, period = plan_times(model, plan, num_sms)
    if isinstance(plan, AggregatedPlan):
        return [("aggregated", plan.num_sms or num_sms, t_p, end - start)]
    found = []
    if plan.decode and (times := output.times.get(plan.decode[0].seq.seq_id)):
        found.append(("decode", plan.num_sms_decode, t_d, (times[-1] - start) / len(times)))
    sampled = [output.times[c.seq.seq_id][0] for c in plan.prefill if c.seq.seq_id in output.times]
    if sampled:
        found.append(("prefill", plan.num_sms_prefill, t_p, min(sampled) - start))
    elif plan.prefill and t_p > plan.k * t_d:
        found.append(("prefill", plan.num_sms_prefill, period, end - start))
    return found


def work(model: LatencyModel, chunks: list[ScheduledChunk]) -> StepWork:
    return model.work([(c.num_new_tokens, c.start) for c in chunks])
