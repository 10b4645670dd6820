"""Tensor parallelism on the CPU (gloo, spawned ranks, interpreted kernels): the engine over 2 and 3 ranks gives the
single-process engine's greedy tokens, with chunked prefill, prefix-cache hits and multiplexed plans chosen on rank 0
only. Each rank costs seconds to spawn, so one engine per case serves the module's tests."""
import pytest

import minidu
from minidu import SamplingParams
from minidu.scheduler.plan import plan_chunks
from tests.conftest import THOROUGH
from tests.engine.helpers import LookaheadPolicy, make_engine, run_steps
from tests.models.checkpoints import write_checkpoint

# Three ranks need head counts they divide: 6 query heads over one kv head (fewer kv heads than ranks: replicated).
TP3 = dict(num_attention_heads=6, num_key_value_heads=1, head_dim=16, vocab_size=96)
CASES = [("LlamaForCausalLM", 2, {}), ("Qwen2ForCausalLM", 2, {}), ("Qwen3ForCausalLM", 3, TP3)]
THOROUGH_CASES = [("LlamaForCausalLM", 3, TP3), ("Qwen2ForCausalLM", 3, TP3), ("Qwen3ForCausalLM", 2, {})]
MULTIPLEXED_CASES = CASES + THOROUGH_CASES if THOROUGH else CASES[:1]  # the quick profile multiplexes one case
# max_num_batched_tokens 8 chunks the 9- and 17-token prompts; the second round repeats whole blocks (4 tokens) of
# the first round's prompts, so its prefills start from prefix-cache hits.
FIRST = [list(range(5, 14)), [3, 4], list(range(30, 47))]
SECOND = [list(range(5, 13)) + [50, 51], list(range(30, 42)) + [60]]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
OPTIONS = dict(max_num_batched_tokens=8, decode_sms_choices=(5,))


def two_rounds(engine: minidu.Engine) -> tuple[list[list[int]], int]:
    """The tokens of both rounds, and the most prompt tokens a second-round request found in the prefix cache."""
    first = [o.token_ids for o in engine.generate(FIRST, GREEDY, use_tqdm=False)]
    ids = [engine.add_request(p, GREEDY) for p in SECOND]
    done, cached = {}, 0
    while engine.has_unfinished_requests():
        result = engine.step()
        if result.plan is not None:
            cached = max([cached] + [c.seq.num_cached_prompt_tokens for c in plan_chunks(result.plan)])
        done |= {o.request_id: o.token_ids for o in result.outputs if o.finished}
    return first + [done[i] for i in ids], cached


@pytest.fixture(scope="module", params=CASES + (THOROUGH_CASES if THOROUGH else []),
                ids=lambda case: f"{case[0].removesuffix('ForCausalLM').lower()}-tp{case[1]}")
def case(request, tmp_path_factory):
    """(tensor-parallel engine, single-process engine, the case) over one tiny checkpoint."""
    arch, ranks, overrides = request.param
    path = tmp_path_factory.mktemp(f"{arch}-tp{ranks}")
    write_checkpoint(path, arch, **overrides)
    with make_engine(path, tensor_parallel_size=ranks, **OPTIONS) as engine:
        yield engine, make_engine(path, **OPTIONS), request.param


def test_tokens_equal_the_single_process_engine(case):
    engine, single, _ = case
    tokens, cached = two_rounds(engine)
    assert cached >= 8, "the second round must hit the prefix cache"
    assert tokens == two_rounds(single)[0]
    assert engine.executor.size == engine.config.tensor_parallel_size
    assert all(len(t) == GREEDY.max_tokens for t in tokens)


def test_multiplexed_plans_from_rank_0_keep_the_tokens(case):
    engine, single, params = case
    if params not in MULTIPLEXED_CASES:
        pytest.skip("multiplexed under tensor parallelism runs for one case unless MINIDU_HYPOTHESIS_PROFILE=thorough")
    expected = [o.token_ids for o in single.generate(FIRST, GREEDY, use_tqdm=False)]
    engine.policy, policy = LookaheadPolicy(k=2), engine.policy
    try:
        tokens, plans = run_steps(engine, FIRST, GREEDY)
    finally:
        engine.policy = policy
    assert tokens == expected
    assert max(p.k for p in plans) == 2, "some steps must have run 2 look-ahead decode steps on every rank"


def test_a_second_tensor_parallel_engine_in_the_process_is_refused(case):
    engine = case[0]
    with pytest.raises(RuntimeError, match="one per process"):
        minidu.Engine(engine.config.model, num_kv_blocks=16, tensor_parallel_size=2)
