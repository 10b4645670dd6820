"""The simulated executor: runs plans on a virtual clock advanced by the latency model's predictions and emits
placeholder tokens, so the whole scheduling stack can be studied on a CPU, quickly and deterministically."""
from minidu.scheduler.plan import AggregatedPlan, Plan, ScheduledChunk, StepOutput
from minidu.scheduler.roofline import LatencyModel


def plan_times(model: LatencyModel, plan: Plan, num_sms: int) -> tuple[float, float, float]:
    """(t_p, t_d, step time) predicted for a plan: aggregated, the mixed step's time (as both t_p and t_d);
    multiplexed, the prefill step, one decode step, and max(k * t_d, t_p)."""
    if isinstance(plan, AggregatedPlan):
        t = _time(model, plan.chunks, plan.num_sms or num_sms)
        return t, t, t
    t_d = _time(model, plan.decode, plan.num_sms_decode)
    t_p = _time(model, plan.prefill, plan.num_sms_prefill)
    return t_p, t_d, max(plan.k * t_d, t_p)


def _time(model: LatencyModel, chunks: list[ScheduledChunk], num_sms: int) -> float:
    return model.step_time([(c.num_new_tokens, c.start) for c in chunks], num_sms) if chunks else 0.0


def placeholder_token(seed: int, step: int, vocab_size: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % vocab_size


class SimulatedExecutor:
    """Aggregated steps take the mixed step's predicted time on all SMs; a multiplexed step takes max(k * t_d, t_p),
    its i-th decode token landing at (i + 1) * t_d and its prefill tokens at t_p."""

    def __init__(self, model: LatencyModel, num_sms: int, vocab_size: int, start_time: float = 0.0):
        self.model, self.num_sms, self.vocab_size = model, num_sms, vocab_size
        self.now = start_time
        self.busy_time = 0.0

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
        self.busy_time += elapsed
        return out

    def _sample(self, out: StepOutput, chunks: list[ScheduledChunk], k: int, time_of) -> None:
        for c in chunks:
            if c.samples:
                step = c.seq.num_output_tokens
                out.add(c.seq.seq_id, [placeholder_token(c.seq.seed, step + i, self.vocab_size) for i in range(k)],
                        [time_of(i) for i in range(k)])
