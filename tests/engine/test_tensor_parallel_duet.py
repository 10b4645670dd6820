"""The real duet policy under tensor parallelism: rank 0's latency model charges one rank's share of the work plus the
all-reduces, decides split steps, and every rank runs them, with the single-process engine's greedy tokens. Its own
module because one tensor-parallel engine may live in a process at a time."""
from minidu import SamplingParams
from minidu.scheduler.plan import MultiplexedPlan
from tests.engine.helpers import make_engine, run_steps, write_slow_profile
from tests.models.checkpoints import write_checkpoint

PROMPTS = [list(range(5, 14)), [3, 4], list(range(30, 47))]


def test_duet_policy_splits_every_rank_and_keeps_the_tokens(tmp_path):
    write_checkpoint(tmp_path / "ckpt", "Qwen3ForCausalLM")
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    options = dict(max_num_batched_tokens=8)
    expected = run_steps(make_engine(tmp_path / "ckpt", **options), PROMPTS, greedy)[0]
    with make_engine(tmp_path / "ckpt", tensor_parallel_size=2, policy="duet",
                     hardware=write_slow_profile(tmp_path / "slow.json"), tbt_slo_ms=0.5, **options) as engine:
        assert engine.latency_model.shape.tensor_parallel_size == 2
        tokens, plans = run_steps(engine, PROMPTS, greedy)
    assert tokens == expected
    multiplexed = [p for p in plans if isinstance(p, MultiplexedPlan)]
    assert multiplexed and max(p.k for p in multiplexed) > 1
