"""Execution plans: what one engine step runs and on how many SMs. The scheduler emits them; executors carry them out."""
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minidu.scheduler.sequence import Sequence

if TYPE_CHECKING:
    from minidu.scheduler.roofline import LatencyModel


@dataclass(slots=True)
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq` starting at token `start`; the chunk that reaches the sequence's last known
    token samples the next one (a decode chunk run for k steps samples k)."""

    seq: Sequence
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        """One token that produces the next: runs through decode attention (and may run k look-ahead steps)."""
        return self.num_new_tokens == 1 and self.samples


@dataclass(slots=True)
class AggregatedPlan:
    """Decode tokens and prefill chunks mixed in one forward pass on `num_sms` SMs (None: all)."""

    chunks: list[ScheduledChunk]
    num_sms: int | None = None
    predicted_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


@dataclass(slots=True)
class MultiplexedPlan:
    """A prefill batch on `num_sms_prefill` SMs while `k` decode steps of the decode batch run back to back on
    `num_sms_decode` other SMs."""

    prefill: list[ScheduledChunk]
    num_sms_prefill: int
    decode: list[ScheduledChunk]
    num_sms_decode: int
    k: int = 1
    predicted_time: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.prefill) + self.k * len(self.decode)


Plan = AggregatedPlan | MultiplexedPlan


@dataclass(slots=True)
class StepOutput:
    """What an executor hands back: each sampling sequence's new tokens and when each was produced (executor clock)."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    times: dict[int, list[float]] = field(default_factory=dict)

    def add(self, seq_id: int, tokens: list[int], times: list[float]) -> None:
        assert len(tokens) == len(times)
        self.tokens[seq_id], self.times[seq_id] = tokens, times


def plan_times(model: "LatencyModel", plan: Plan, num_sms: int) -> tuple[float, float, float]:
    """(t_p, t_d, step time) predicted for a plan: aggregated, the mixed step's time (as both t_p and t_d);
    multiplexed, the prefill step and one decode step side by side, and the period (LatencyModel.period_time)."""
    if isinstance(plan, AggregatedPlan):
        t = chunks_time(model, plan.chunks, plan.num_sms or num_sms)
        return t, t, t
    t_p, t_d = model.multiplexed_times(model.work([(c.num_new_tokens, c.start) for c in plan.prefill]),
                                      plan.num_sms_prefill,
                                      model.work([(c.num_new_tokens, c.start) for c in plan.decode]),
                                      plan.num_sms_decode)
    return t_p, t_d, model.period_time(plan.k, t_d, t_p)


def chunks_time(model: "LatencyModel", chunks: list[ScheduledChunk], num_sms: int) -> float:
    """The latency model's time for one forward pass over `chunks` on `num_sms` SMs (0 for none)."""
    return model.step_time([(c.num_new_tokens, c.start) for c in chunks], num_sms) if chunks else 0.0
