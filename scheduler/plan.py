"""Execution plans: what one engine step runs and on how many SMs. The scheduler emits them; executors carry them out."""
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minidu.scheduler.sequence import Sequence

if TYPE_CHECKING:
    from minidu.scheduler.roofline import LatencyModel


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq` starting at token `start`. Its kind is fixed when it is scheduled: it `samples`
    when it reaches the sequence's last known token, and it `is_decode` when that is its only token (decode attention,
    and possibly k look-ahead steps, each sampling one token)."""

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool
    is_decode: bool

    @classmethod
    def of(cls, seq: Sequence, start: int, num_new_tokens: int) -> "ScheduledChunk":
        samples = start + num_new_tokens == seq.num_tokens
        return cls(seq, start, num_new_tokens, samples, samples and num_new_tokens == 1)

    def truncated(self, num_new_tokens: int) -> "ScheduledChunk":
        """The same chunk cut to its first `num_new_tokens` tokens."""
        assert 1 <= num_new_tokens <= self.num_new_tokens
        return self if num_new_tokens == self.num_new_tokens else ScheduledChunk.of(self.seq, self.start, num_new_tokens)


@dataclass(frozen=True, slots=True)
class Proposal:
    """What the scheduler could run next (`chunks`, decodes first, then prefill chunks in FCFS order) and the running
    requests it must preempt whatever runs (`preempt`: no room for their next tokens)."""

    chunks: list[ScheduledChunk]
    preempt: tuple[Sequence, ...] = ()

    def split(self) -> tuple[list[ScheduledChunk], list[ScheduledChunk]]:
        """(prefill chunks, decode chunks)."""
        return [c for c in self.chunks if not c.is_decode], [c for c in self.chunks if c.is_decode]


@dataclass(slots=True)
class AggregatedPlan:
    """Decode tokens and prefill chunks mixed in one forward pass on `num_sms` SMs (None: all)."""

    chunks: list[ScheduledChunk]
    num_sms: int | None = None
    preempt: tuple[Sequence, ...] = ()

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
    preempt: tuple[Sequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.prefill) + self.k * len(self.decode)


Plan = AggregatedPlan | MultiplexedPlan


def plan_chunks(plan: Plan) -> list[ScheduledChunk]:
    return plan.chunks if isinstance(plan, AggregatedPlan) else [*plan.prefill, *plan.decode]


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


@dataclass(frozen=True, slots=True)
class StepPart:
    """One part of an executed step, as the latency model sees it: its kind ("aggregated", or a multiplexed step's
    "prefill" or "decode"), its SM budget, and its predicted and measured seconds."""

    kind: str
    num_sms: int
    predicted: float
    measured: float


def measured_parts(plan: Plan, predicted: tuple[float, float, float], output: StepOutput, start: float, end: float,
                   num_sms: int) -> list[StepPart]:
    """The parts of an executed plan whose times its token times reveal: an aggregated step is its span; a decode
    step is the span of its first request's k tokens over k; the prefill step is the time of its first sampled token,
    else the whole period when the prefill was predicted to be the period's critical path (the rest of the time the
    decode steps hide it). `predicted` is the plan's plan_times."""
    t_p, t_d, period = predicted
    if isinstance(plan, AggregatedPlan):
        return [StepPart("aggregated", plan.num_sms or num_sms, t_p, end - start)]
    found = []
    if plan.decode and (times := output.times.get(plan.decode[0].seq.seq_id)):
        found.append(StepPart("decode", plan.num_sms_decode, t_d, (times[-1] - start) / len(times)))
    sampled = [output.times[c.seq.seq_id][0] for c in plan.prefill if c.seq.seq_id in output.times]
    if sampled:
        found.append(StepPart("prefill", plan.num_sms_prefill, t_p, min(sampled) - start))
    elif plan.prefill and t_p > plan.k * t_d:
        found.append(StepPart("prefill", plan.num_sms_prefill, period, end - start))
    return found


def chunks_time(model: "LatencyModel", chunks: list[ScheduledChunk], num_sms: int) -> float:
    """The latency model's time for one forward pass over `chunks` on `num_sms` SMs (0 for none)."""
    return model.step_time([(c.num_new_tokens, c.start) for c in chunks], num_sms) if chunks else 0.0
