"""The simulated executor and plan_times against times written out by hand from the latency model's parts, and the
engine's measured_parts read back from the executor's token times."""
import pytest

from minidu.scheduler.hardware import HardwareProfile
from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, ScheduledChunk, StepPart, measured_parts, plan_times
from minidu.scheduler.policy import StaticPolicy
from minidu.scheduler.roofline import LatencyModel, ModelShape
from minidu.scheduler.sequence import Sequence
from minidu.scheduler.sim_executor import SimulatedExecutor

SHAPE = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                   vocab_size=100)
# Compute-bound everywhere (bandwidth 1e30): no bandwidth sharing, so side by side only the co-run slowdown applies.
HW = HardwareProfile("toy", 8, 8e9, 1e30, 4, layer_overhead=1e-6, corun_decode_slowdown=0.25, period_overhead=1e-4)
MODEL = LatencyModel(SHAPE, HW)


def decode_chunk(context: int) -> ScheduledChunk:
    return ScheduledChunk.of(Sequence("d", list(range(context + 1)), max_tokens=8), context, 1)


def prefill_chunk(prompt: int, start: int, tokens: int) -> ScheduledChunk:
    return ScheduledChunk.of(Sequence("p", list(range(prompt)), max_tokens=8), start, tokens)


def test_multiplexed_step_by_hand():
    decode, prefill = [decode_chunk(7), decode_chunk(3)], [prefill_chunk(10, 0, 10)]
    plan = MultiplexedPlan(prefill, 6, decode, 2, k=3)
    t_d = MODEL.step_time([(1, 7), (1, 3)], 2) * 1.25
    t_p = MODEL.step_time([(10, 0)], 6)
    period = max(3 * t_d, t_p) + 1e-4
    assert plan_times(MODEL, plan, 8) == pytest.approx((t_p, t_d, period), rel=1e-12)
    executor = SimulatedExecutor(MODEL, 8, 100)
    executor.advance_to(2.0)
    out = executor.execute(plan)
    assert out.times[decode[0].seq.seq_id] == pytest.approx([2.0 + t_d, 2.0 + 2 * t_d, 2.0 + 3 * t_d], rel=1e-12)
    assert out.times[prefill[0].seq.seq_id] == pytest.approx([2.0 + t_p], rel=1e-12)
    assert executor.clock() == pytest.approx(2.0 + period, rel=1e-12)
    parts = measured_parts(plan, (t_p, t_d, period), out, 2.0, executor.clock(), 8)
    found = {p.kind: (p.num_sms, p.predicted, p.measured) for p in parts}
    assert found["decode"] == pytest.approx((2, t_d, t_d), rel=1e-9)
    assert found["prefill"] == pytest.approx((6, t_p, t_p), rel=1e-9)


def test_aggregated_step_and_a_chunk_that_does_not_sample():
    chunks = [decode_chunk(5), prefill_chunk(20, 4, 8)]  # the prefill chunk stops short of the prompt's end
    plan = AggregatedPlan(chunks)
    t = MODEL.step_time([(1, 5), (8, 4)], 8)
    assert plan_times(MODEL, plan, 8) == pytest.approx((t, t, t), rel=1e-12)
    executor = SimulatedExecutor(MODEL, 8, 100)
    out = executor.execute(plan)
    assert set(out.times) == {chunks[0].seq.seq_id}
    parts = measured_parts(plan, (t, t, t), out, 0.0, executor.clock(), 8)
    assert parts == [StepPart("aggregated", 8, t, pytest.approx(t))]


def test_static_policy_keeps_its_budget_among_the_choices():
    StaticPolicy(MODEL, 8, 4, decode_sms_choices=(2, 4))
    with pytest.raises(ValueError, match="decode_sms_choices"):
        StaticPolicy(MODEL, 8, 3, decode_sms_choices=(2, 4))
