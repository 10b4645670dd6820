"""Engine.step() returns one StepResult: the outputs, the committed plan, its SM budget and its predicted and measured
time; engine options are EngineConfig's fields and nothing else."""
import pytest

import minidu
from minidu import SamplingParams
from minidu.scheduler.plan import AggregatedPlan


def sim_engine(**options) -> minidu.Engine:
    return minidu.Engine("qwen3-8b", backend="sim", hardware="h200", **options)


def test_step_result_carries_plan_budget_and_times():
    engine = sim_engine()
    model = engine.latency_model
    engine.add_request(list(range(1, 301)), SamplingParams(max_tokens=2, ignore_eos=True))
    first = engine.step()
    assert isinstance(first.plan, AggregatedPlan) and [c.num_new_tokens for c in first.plan.chunks] == [300]
    assert first.num_sms == 132
    # one 300-token prefill on all 132 SMs: the latency model's own call, independently of plan_times
    assert first.predicted_time == pytest.approx(model.step_time([(300, 0)], 132), rel=1e-12)
    assert first.elapsed == pytest.approx(first.predicted_time, rel=1e-12)  # the simulated clock runs on predictions
    assert [o.new_token_ids for o in first.outputs] != [[]]
    second = engine.step()
    assert second.start == pytest.approx(first.end)
    assert [c.is_decode for c in second.plan.chunks] == [True]
    assert second.outputs[0].finished and not engine.has_unfinished_requests()


def test_rejected_request_is_reported_without_a_plan():
    engine = sim_engine(max_model_len=64)
    engine.add_request(list(range(1, 100)))
    result = engine.step()
    assert result.plan is None and result.predicted_time is None
    assert result.outputs[0].finish_reason == "abort" and "max_model_len" in result.outputs[0].error


def test_unknown_engine_option_is_named():
    with pytest.raises(ValueError, match="max_batch_size"):
        sim_engine(max_batch_size=4)
