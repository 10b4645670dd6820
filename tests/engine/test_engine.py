"""Engine properties on a tiny random Llama run through the interpreter: greedy tokens match the float64 reference and
do not depend on batching, prefix-cache hits, preemption or prefill chunking; seeded sampling reproduces; blocks are
all returned; bad requests fail alone."""
import pytest
import torch

import minidu
from minidu import SamplingParams
from tests.engine.helpers import make_engine
from tests.models.checkpoints import random_weights, tiny_config, write_checkpoint
from tests.models.reference import reference_logits

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    write_checkpoint(path, "LlamaForCausalLM")
    return path


def reference_greedy(prompt: list[int], n: int) -> list[int]:
    config = tiny_config("LlamaForCausalLM")
    weights = random_weights(config)
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(reference_logits(config, weights, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def all_blocks_free(engine: minidu.Engine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


@pytest.fixture(scope="module")
def alone(checkpoint):
    """Each prompt's greedy tokens, generated on its own."""
    return [make_engine(checkpoint).generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in PROMPTS]


def test_greedy_matches_float64_reference(alone):
    assert alone[0] == reference_greedy(PROMPTS[0], GREEDY.max_tokens)


def test_batched_equals_alone_and_blocks_return(checkpoint, alone):
    engine = make_engine(checkpoint)
    outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" and o.prompt_token_ids == p for o, p in zip(outs, PROMPTS))
    assert all_blocks_free(engine)


def test_prefix_cache_hit_gives_same_tokens(checkpoint, alone):
    engine = make_engine(checkpoint)
    first = engine.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    engine.add_request(PROMPTS[0], GREEDY, request_id="again")
    seq = engine._requests["again"].seq
    second = None
    while engine.has_unfinished_requests():
        second = next((o for o in engine.step().outputs if o.finished), second)
    assert seq.num_cached_prompt_tokens == 8  # two full blocks of 4 reused; the last token is recomputed
    assert first.token_ids == second.token_ids == alone[0]


def test_tiny_kv_pool_preempts_without_losing_tokens(checkpoint):
    # Three 4-token prompts fit at admission (a block each); their decodes then outgrow the 6-block pool.
    prompts = [[30, 31, 32, 33], [40, 41, 42, 43], [50, 51, 52, 53]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = make_engine(checkpoint, num_kv_blocks=6, max_model_len=16, enable_prefix_caching=False)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [reference_greedy(p, 8) for p in prompts]
    assert all_blocks_free(engine)


def test_tiny_token_budget_chunks_prefill(checkpoint, alone):
    engine = make_engine(checkpoint, max_num_batched_tokens=4, max_num_seqs=2)
    outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone


def test_seeded_sampling_reproduces_in_any_batch(checkpoint):
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=4, ignore_eos=True, seed=1234)
    alone = make_engine(checkpoint).generate([PROMPTS[0]], params, use_tqdm=False)[0].token_ids
    other = SamplingParams(temperature=0.7, max_tokens=3, ignore_eos=True)
    batched = make_engine(checkpoint, seed=99).generate([PROMPTS[1], PROMPTS[0]], [other, params], use_tqdm=False)
    assert batched[1].token_ids == alone
    reseeded = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=4, ignore_eos=True, seed=4321)
    draws = {tuple(make_engine(checkpoint).generate([PROMPTS[0]], reseeded, use_tqdm=False)[0].token_ids)}
    assert len(draws | {tuple(alone)}) == 2, "a different seed should give a different sample"


def test_abort_frees_every_block(checkpoint):
    engine = make_engine(checkpoint)
    rid = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    keep = engine.add_request(PROMPTS[1], GREEDY)
    engine.step()
    engine.abort(rid)
    outs = engine.step().outputs
    aborted = next(o for o in outs if o.request_id == rid)
    assert aborted.finished and aborted.finish_reason == "abort"
    while engine.has_unfinished_requests():
        outs = engine.step().outputs
    assert all_blocks_free(engine)
    assert keep not in engine._requests


def test_too_long_prompt_fails_alone(checkpoint, alone):
    engine = make_engine(checkpoint, max_model_len=12)
    outs = engine.generate([PROMPTS[1], list(range(1, 14)), PROMPTS[2]], GREEDY, use_tqdm=False)
    assert outs[1].finish_reason == "abort" and "max_model_len=12" in outs[1].error and outs[1].token_ids == []
    assert outs[0].token_ids == alone[1] and outs[2].token_ids == alone[2]


def test_bad_token_ids_and_text_without_tokenizer_fail_alone(checkpoint):
    engine = make_engine(checkpoint)
    outs = engine.generate([[1, 10_000], "hello", PROMPTS[1]], GREEDY, use_tqdm=False)
    assert "[0, 128)" in outs[0].error
    assert "tokenizer" in outs[1].error
    assert outs[2].error is None and len(outs[2].token_ids) == GREEDY.max_tokens


def test_stop_token_and_eos(checkpoint, alone):
    engine = make_engine(checkpoint)
    stop = alone[0][1]
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[stop]),
                          use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == alone[0][:2]
    assert len(out.token_times) == 2 and out.first_token_time >= out.arrival_time


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(seed=1.5), "seed")])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size"), (dict(max_num_seqs=8, max_num_batched_tokens=4), "max_num_batched_tokens"),
    (dict(max_model_len=10_000), "max_model_len"), (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    (dict(policy="fastest"), "policy")])
def test_invalid_engine_args(checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_engine(checkpoint, **kwargs)


def test_bf16_on_cpu_is_refused(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("only the CPU refuses bf16")
    with pytest.raises(ValueError, match="bfloat16"):
        make_engine(checkpoint, dtype="bfloat16")


def test_stop_string_truncates_text_and_finishes(tmp_path):
    write_checkpoint(tmp_path, tokenizer=True)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = make_engine(tmp_path).generate(["Hello"], greedy, use_tqdm=False)[0]
    stop = full.text[4:6]
    assert stop and full.text.find(stop) == 4, "pick a stop string whose first occurrence is at index 4"
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop)
    engine = make_engine(tmp_path)
    out = engine.generate(["Hello"], params, use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == full.text[:4]
    assert out.token_ids == full.token_ids[:len(out.token_ids)] and len(out.token_ids) < len(full.token_ids)
    assert all_blocks_free(engine)
