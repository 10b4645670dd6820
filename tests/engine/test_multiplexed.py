"""Multiplexed plans on the real model (interpreted): a prefill batch on one SM budget beside k look-ahead decode steps
on another gives exactly the tokens of aggregated steps, because the kernels are budget-invariant and each request's
sampling depends only on its seed and token index."""
import pytest

import minidu
from minidu import SamplingParams
from minidu.scheduler.plan import MultiplexedPlan
from tests.engine.helpers import run_steps, write_slow_profile, LookaheadPolicy, make_engine
from tests.models.checkpoints import write_checkpoint

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 21, 22, 23, 24], list(range(30, 47))]
LOOKAHEAD_OPTIONS = dict(decode_sms_choices=(5,))  # the budget LookaheadPolicy gives decode, for CUDA graphs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    write_checkpoint(path, "Qwen3ForCausalLM")
    return path


def run(engine: minidu.Engine, params) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
    [SamplingParams(temperature=0.8, top_k=30, top_p=0.9, max_tokens=5 + i, ignore_eos=True, seed=i) for i in range(4)],
], ids=["greedy", "seeded"])
def test_lookahead_multiplexed_equals_aggregated(checkpoint, params):
    expected = run(make_engine(checkpoint, max_num_batched_tokens=8), params)
    engine = make_engine(checkpoint, max_num_batched_tokens=8, **LOOKAHEAD_OPTIONS)
    engine.policy = LookaheadPolicy(k=3)
    tokens, plans = run_steps(engine, PROMPTS, params)
    assert tokens == expected
    assert max(p.k for p in plans) == 3, "some steps must have run 3 look-ahead decode steps"
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_lookahead_stops_at_stop_token_and_max_tokens(checkpoint):
    greedy = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    full = run(make_engine(checkpoint), greedy)
    stop = full[0][2]
    params = [SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[stop]),
              SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), greedy, greedy]
    engine = make_engine(checkpoint, **LOOKAHEAD_OPTIONS)
    engine.policy = LookaheadPolicy(k=4)
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    assert outs[0].token_ids == full[0][:full[0].index(stop) + 1] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == full[1][:2] and outs[1].finish_reason == "length"
    assert [o.token_ids for o in outs[2:]] == full[2:]
    assert all(len(o.token_times) == len(o.token_ids) for o in outs)


def test_static_policy_engine_matches_aggregated(checkpoint):
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = run(make_engine(checkpoint), greedy)
    engine = make_engine(checkpoint, policy="static", hardware="h200", decode_sms=16)
    assert run(engine, greedy) == expected


def test_duet_policy_splits_and_keeps_the_tokens(checkpoint, tmp_path):
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = run(make_engine(checkpoint, max_num_batched_tokens=8), greedy)
    engine = make_engine(checkpoint, max_num_batched_tokens=8, policy="duet",
                         hardware=write_slow_profile(tmp_path / "slow.json"), tbt_slo_ms=0.5)
    tokens, plans = run_steps(engine, PROMPTS, greedy)
    assert tokens == expected
    multiplexed = [p for p in plans if isinstance(p, MultiplexedPlan)]
    assert multiplexed and max(p.k for p in multiplexed) > 1
    assert all(p.num_sms_prefill + p.num_sms_decode <= 16 for p in multiplexed)


def test_eager_multiplexed_plan_launches_prefill_and_decode_on_their_own_lanes(checkpoint):
    """Without CUDA graphs (enforce_eager, or the CPU) a multiplexed plan still puts its decode steps and its prefill
    on two lanes (streams on CUDA) with their own budgets, and gives the aggregated tokens."""
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = run(make_engine(checkpoint, max_num_batched_tokens=8), greedy)
    engine = make_engine(checkpoint, max_num_batched_tokens=8, enforce_eager=True)
    engine.policy = LookaheadPolicy(k=2)
    runner = engine.executor
    launches = []
    forward = runner.forward_and_sample

    def recording(inputs, num_sms):
        launches.append((runner.current_lane, num_sms))
        return forward(inputs, num_sms)

    runner.forward_and_sample = recording
    assert run(engine, greedy) == expected
    assert ("decode", 5) in launches and ("prefill", 3) in launches
    assert {lane for lane, _ in launches} <= {"decode", "prefill"}
    assert all(sms == {"decode": 5, "prefill": 3}[lane] for lane, sms in launches)
