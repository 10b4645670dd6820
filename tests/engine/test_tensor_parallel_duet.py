"""The real duet policy under tensor parallelism: rank 0's latency model charges one rank's share of the work plus the
all-reduces, decides split steps, and every rank runs them, with the single-process engine's greedy tokens. Its own
module because one tensor-parallel engine may live in a process at a time."""
from minidu import SamplingParams
from minidu.scheduler.hardware import HardwareProfile
from minidu.scheduler.plan import MultiplexedPlan
from tests.engine.helpers import make_engine
from tests.models.checkpoints import write_checkpoint

PROMPTS = [list(range(5, 14)), [3, 4], list(range(30, 47))]


def test_duet_policy_splits_every_rank_and_keeps_the_tokens(tmp_path):
    write_checkpoint(tmp_path / "ckpt", "Qwen3ForCausalLM")
    # A deliberately slow 16-SM profile (with an interconnect, which TP needs) makes the tiny model's mixed steps break
    # a 0.5 ms objective that split decode steps meet, so duet emits multiplexed plans with look-ahead.
    profile = tmp_path / "slow.json"
    profile.write_text(HardwareProfile("slow-gpu", 16, 2e9, 2e9, 4, 0.0, interconnect_bandwidth=1e9,
                                       interconnect_latency=1e-6).to_json())
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    options = dict(max_num_batched_tokens=8)
    expected = [o.token_ids for o in make_engine(tmp_path / "ckpt", **options).generate(PROMPTS, greedy, use_tqdm=False)]
    with make_engine(tmp_path / "ckpt", tensor_parallel_size=2, policy="duet", hardware=str(profile), tbt_slo_ms=0.5,
                     **options) as engine:
        assert engine.latency_model.shape.tensor_parallel_size == 2
        ids = [engine.add_request(p, greedy) for p in PROMPTS]
        plans, done = [], {}
        while engine.has_unfinished_requests():
            result = engine.step()
            done |= {o.request_id: o.token_ids for o in result.outputs if o.finished}
            plans.append(result.plan)
    assert [done[i] for i in ids] == expected
    multiplexed = [p for p in plans if isinstance(p, MultiplexedPlan)]
    assert multiplexed and max(p.k for p in multiplexed) > 1
