"""Scheduling policies: how each step of the batcher becomes an execution plan, and on how many SMs.

`aggregated` (vLLM / Sarathi-Serve) mixes decodes and prefill chunks in one step on all SMs; `prefill-first`
(nano-vllm) runs prefill steps alone, never mixed with decodes; `static` always splits the SMs the same way, a stand-in
for disaggregated prefill and decode on one GPU; `duet` (DuetServe) runs aggregated until the latency model predicts
the mixed step would break the TBT objective, then splits the SMs so decode just meets it and prefill gets the rest.

A policy only reads the scheduler's proposals (`Scheduler.propose` changes nothing) and returns a plan; the engine has
the scheduler commit it.
"""
from dataclasses import dataclass

from minidu.scheduler.partition import choose_partition
from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, Plan, chunks_time
from minidu.scheduler.roofline import LatencyModel
from minidu.scheduler.scheduler import Scheduler

POLICIES = ("aggregated", "prefill-first", "static", "duet")


class AggregatedPolicy:
    name = "aggregated"

    def plan(self, scheduler: Scheduler) -> Plan:
        proposal = scheduler.propose()
        return AggregatedPlan(proposal.chunks, preempt=proposal.preempt)


class PrefillFirstPolicy:
    name = "prefill-first"

    def plan(self, scheduler: Scheduler) -> Plan:
        proposal = scheduler.propose(decodes=False)
        if not proposal.chunks:
            proposal = scheduler.propose(prefills=False)
        return AggregatedPlan(proposal.chunks, preempt=proposal.preempt)


@dataclass(slots=True)
class StaticPolicy:
    """Always multiplexed: decode on `decode_sms` SMs, prefill on the rest, with as many look-ahead decode steps as
    cover the predicted prefill time."""

    model: LatencyModel
    num_sms: int
    decode_sms: int
    max_k: int = 8
    name: str = "static"

    def __post_init__(self):
        if not 1 <= self.decode_sms < self.num_sms:
            raise ValueError(f"decode_sms must be in [1, {self.num_sms - 1}], got {self.decode_sms}")

    def plan(self, scheduler: Scheduler) -> Plan:
        proposal = scheduler.propose()
        prefill, decode = proposal.split()
        prefill_sms = self.num_sms - self.decode_sms
        t_p = chunks_time(self.model, prefill, prefill_sms)
        t_d = chunks_time(self.model, decode, self.decode_sms)
        k = max(1, min(self.max_k, round(t_p / t_d))) if prefill and decode else 1
        return MultiplexedPlan(prefill, prefill_sms, decode, self.decode_sms, k, proposal.preempt)


@dataclass(slots=True)
class DuetPolicy:
    """DuetServe: aggregated while the predicted mixed step meets `tbt_slo` seconds, else the partition optimizer's split."""

    model: LatencyModel
    num_sms: int
    tbt_slo: float
    granularity: int = 2
    max_k: int = 8
    name: str = "duet"

    def plan(self, scheduler: Scheduler) -> Plan:
        proposal = scheduler.propose()
        prefill, decode = proposal.split()
        d = choose_partition([c.start for c in decode], [(c.num_new_tokens, c.start) for c in prefill], self.tbt_slo,
                             self.model, self.num_sms, granularity=self.granularity, max_k=self.max_k, prefer_tbt=True)
        if d.mode == "aggregated":
            return AggregatedPlan(proposal.chunks, preempt=proposal.preempt)
        kept = prefill[:d.num_prefill_chunks]
        if kept:
            kept[-1] = kept[-1].truncated(d.last_chunk_tokens)
        return MultiplexedPlan(kept, d.num_sms_prefill, decode, d.num_sms_decode, d.k, proposal.preempt)
