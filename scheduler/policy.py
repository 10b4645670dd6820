"""Scheduling policies: how each step of the batcher becomes an execution plan, and on how many SMs.

`aggregated` (vLLM / Sarathi-Serve) mixes decodes and prefill chunks in one step on all SMs; `prefill-first`
(nano-vllm) runs prefill steps alone, never mixed with decodes; `static` always splits the SMs the same way, a stand-in
for disaggregated prefill and decode on one GPU; `duet` (DuetServe) runs aggregated until the latency model predicts
the mixed step would break the TBT objective, then splits the SMs so decode just meets it and prefill gets the rest.

A policy only reads the scheduler's proposals (`Scheduler.propose` changes nothing) and returns a plan; the engine has
the scheduler commit it.
"""
from dataclasses import dataclass, field

from minidu.scheduler.correction import StepCorrection
from minidu.scheduler.partition import check_decode_sms_choices, choose_partition
from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, Plan, ScheduledChunk, StepPart
from minidu.scheduler.roofline import LatencyModel, StepWork
from minidu.scheduler.scheduler import Scheduler

POLICIES = ("aggregated", "prefill-first", "static", "duet")


class Policy:
    """Chooses each step's plan from the scheduler's proposals, and may learn from how long the steps took."""

    name: str

    def plan(self, scheduler: Scheduler) -> Plan:
        raise NotImplementedError

    def observe(self, parts: list[StepPart]) -> None:
        """Sees the measured parts of an executed step; only the duet policy learns from them."""


class AggregatedPolicy(Policy):
    name = "aggregated"

    def plan(self, scheduler: Scheduler) -> Plan:
        proposal = scheduler.propose()
        return AggregatedPlan(proposal.chunks, preempt=proposal.preempt)


class PrefillFirstPolicy(Policy):
    name = "prefill-first"

    def plan(self, scheduler: Scheduler) -> Plan:
        proposal = scheduler.propose(decodes=False)
        if not proposal.chunks:
            proposal = scheduler.propose(prefills=False)
        return AggregatedPlan(proposal.chunks, preempt=proposal.preempt)


@dataclass(slots=True)
class StaticPolicy(Policy):
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
        proposal = scheduler.propose()
        prefill, decode = proposal.split()
        prefill_sms = self.num_sms - self.decode_sms
        t_p, t_d = self.model.multiplexed_times(work(self.model, prefill), prefill_sms, work(self.model, decode),
                                                self.decode_sms)
        k = max(1, min(self.max_k, round(t_p / t_d))) if prefill and decode else 1
        return MultiplexedPlan(prefill, prefill_sms, decode, self.decode_sms, k, proposal.preempt)


# Planned decode steps leave this fraction of the TBT objective free: the latency model's error on real steps is
# around 10% (Vidur, MuxWise), and a step planned at 0.99 tau that runs 5% slow breaks the objective.
DEFAULT_MARGIN = 0.1


@dataclass(slots=True)
class DuetPolicy(Policy):
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
        proposal = scheduler.propose()
        prefill, decode = proposal.split()
        d = choose_partition([c.start for c in decode], [(c.num_new_tokens, c.start) for c in prefill], self.tbt_slo,
                             self.model, self.num_sms, decode_sms_choices=self.decode_sms_choices, max_k=self.max_k,
                             prefer_tbt=True, margin=self.margin, correction=self.correction)
        if d.split is None:
            return AggregatedPlan(proposal.chunks, preempt=proposal.preempt)
        return d.split.plan(prefill, decode, proposal.preempt)

    def observe(self, parts: list[StepPart]) -> None:
        """Feeds the correction with the predicted and measured times of an executed step's parts."""
        if self.correction is not None:
            for part in parts:
                self.correction.observe(part.kind, part.num_sms, part.predicted, part.measured)


def work(model: LatencyModel, chunks: list[ScheduledChunk]) -> StepWork:
    return model.work([(c.num_new_tokens, c.start) for c in chunks])
