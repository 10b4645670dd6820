"""The simulated executor: runs plans on a virtual clock advanced by the latency model's predictions and emits
placeholder tokens, so the whole scheduling stack can be studied on a CPU, quickly and deterministically."""
from minidu.scheduler.plan import AggregatedPlan, Plan, ScheduledChunk, StepOutput, plan_times
from minidu.scheduler.roofline import LatencyModel


def placeholder_token(seed: int, step: int, vocab_size: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % vocab_size


class SimulatedExecutor:
    """Steps take the time `model` gives them, the simulator's ground truth (which may differ from the planner's):
    aggregated steps the mixed step's time on all SMs; a multiplexed step its period (LatencyModel.period_time), its
    i-th decode token landing at (i + 1) * t_d and its prefill tokens at t_p, t_d and t_p taken side by side."""

    def __init__(self, model: LatencyModel, num_sms: int, vocab_size: int):
        self.model, self.num_sms, self.vocab_size = model, num_sms, vocab_size
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        """Idles until `t` (nothing to run before the next arrival)."""
        self.now = max(self.now, t)

    def execute(self, plan: Plan) -> StepOutput:
        out = StepOutput()
        start = self.now
        t_p, t_d, elapsed = plan_times(self.model, plan, self.num_sms)
        if isinstance(plan, AggregatedPlan):
            self._sample(out, plan.chunks, 1, lambda i: start + elapsed)
        else:
            self._sample(out, plan.decode, plan.k, lambda i: start + (i + 1) * t_d)
            self._sample(out, plan.prefill, 1, lambda i: start + t_p)
        self.now += elapsed
        return out

    def _sample(self, out: StepOutput, chunks: list[ScheduledChunk], k: int, time_of) -> None:
        for c in chunks:
            if c.samples:
                step = c.seq.num_output_tokens
                out.add(c.seq.seq_id, [placeholder_token(c.seq.seed, step + i, self.vocab_size) for i in range(k)],
                        [time_of(i) for i in range(k)])
