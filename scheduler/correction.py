"""Online correction of the latency model from measured step times: per step kind and SM budget, how much slower
(or faster) steps ran than predicted, so that the planner keeps the TBT objective when its model is wrong."""
from dataclasses import dataclass, field

KINDS = ("aggregated", "prefill", "decode")


@dataclass(slots=True)
class StepCorrection:
    """Exponentially weighted mean (weight `alpha` per observation) of measured / predicted seconds, and of its
    absolute deviation, per (kind, SM budget). `factor` is mean + `spread` deviations, so that steps whose error
    varies stay covered; a budget not yet observed borrows its kind's pooled estimate (co-run slowdowns and kernel
    inefficiencies are shared across budgets), and a kind never observed gets 1."""

    alpha: float = 0.2
    spread: float = 1.0
    _by_budget: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)
    _by_kind: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not self.spread >= 0:
            raise ValueError(f"spread must be >= 0, got {self.spread!r}")

    def observe(self, kind: str, num_sms: int, predicted: float, measured: float) -> None:
        """Records one step of `kind` on `num_sms` SMs (seconds); non-positive times carry no information."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if predicted <= 0 or measured <= 0:
            return
        ratio = measured / predicted
        self._by_budget[kind, num_sms] = self._blend(self._by_budget.get((kind, num_sms)), ratio)
        self._by_kind[kind] = self._blend(self._by_kind.get(kind), ratio)

    def factor(self, kind: str, num_sms: int) -> float:
        """The multiplier for the model's prediction of a `kind` step on `num_sms` SMs."""
        estimate = self._by_budget.get((kind, num_sms)) or self._by_kind.get(kind)
        if estimate is None:
            return 1.0
        mean, deviation = estimate
        return mean + self.spread * deviation

    def _blend(self, estimate: tuple[float, float] | None, ratio: float) -> tuple[float, float]:
        if estimate is None:
            return ratio, 0.0
        mean, deviation = estimate
        mean += self.alpha * (ratio - mean)
        return mean, deviation + self.alpha * (abs(ratio - mean) - deviation)
