"""StepCorrection: the factor follows measured/predicted ratios per kind and budget, pooled for unseen budgets."""
import pytest

from minidu.scheduler.correction import StepCorrection


def test_unobserved_kinds_are_uncorrected():
    c = StepCorrection()
    assert c.factor("decode", 16) == c.factor("aggregated", 132) == 1.0


def test_constant_error_is_learned_exactly_and_pooled_across_budgets():
    c = StepCorrection(alpha=0.5, spread=2.0)
    for _ in range(3):
        c.observe("decode", 32, predicted=0.010, measured=0.013)
    assert c.factor("decode", 32) == pytest.approx(1.3)  # no deviation: the spread adds nothing
    assert c.factor("decode", 48) == pytest.approx(1.3)  # an unseen budget borrows the kind's estimate
    assert c.factor("prefill", 32) == 1.0


def test_ewma_and_deviation_by_hand():
    c = StepCorrection(alpha=0.5, spread=1.0)
    c.observe("aggregated", 132, 1.0, 1.0)
    c.observe("aggregated", 132, 1.0, 2.0)
    mean = 1.0 + 0.5 * (2.0 - 1.0)  # 1.5
    deviation = 0.0 + 0.5 * (abs(2.0 - mean) - 0.0)  # 0.25
    assert c.factor("aggregated", 132) == pytest.approx(mean + deviation)


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        StepCorrection().observe("mixed", 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        StepCorrection(alpha=0)
    c = StepCorrection()
    c.observe("decode", 8, 0.0, 1.0)  # no information in a zero prediction
    assert c.factor("decode", 8) == 1.0
