"""No request poisons the engine: validation at the public edges (SamplingParams, EngineConfig, add_request) names
what is wrong, a step that raises fails only its own requests, and random mixes of valid and invalid requests leave
valid greedy tokens equal to solo runs and every KV block free."""
import math

import pytest
from hypothesis import given, strategies as st

import minidu
from minidu import SamplingParams
from minidu.engine_config import EngineConfig
from minidu.scheduler.plan import plan_chunks
from tests.engine import helpers as engine_helpers
from tests.models.checkpoints import write_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
MAX_MODEL_LEN = 32


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=math.inf), "temperature"), (dict(temperature=1e39), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(top_k=2**40), "top_k"), (dict(top_k=-2), "top_k"),
    (dict(top_k=True), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1e-50), "top_p"),
    (dict(top_p=math.nan), "top_p"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.0), "max_tokens"),
    (dict(seed=2**63), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(seed=1.5), "seed"),
    (dict(ignore_eos="yes"), "ignore_eos"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids="5"), "stop_token_ids"),
    (dict(stop=5), "stop"), (dict(stop=[""]), "stop"), (dict(stop=["a", 3]), "stop"),
])
def test_sampling_params_refuse_bad_values_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 9.9e-6])
def test_tiny_temperature_is_the_greedy_limit(temperature):
    assert SamplingParams(temperature=temperature).is_greedy


def test_extreme_valid_values_fit_the_kernel_types():
    p = SamplingParams(temperature=3e38, top_k=2**31 - 1, top_p=1e-30, seed=-2**63, stop=("a", "b"))
    assert (p.top_k, p.seed, p.stop) == (2**31 - 1, -2**63, ["a", "b"])


@pytest.mark.parametrize("kwargs, name", [
    (dict(decode_sms=0), "decode_sms"), (dict(enable_prefix_caching="no"), "enable_prefix_caching"),
    (dict(enforce_eager=1), "enforce_eager"), (dict(max_model_len=0), "max_model_len"),
    (dict(block_size=True), "block_size"), (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization"),
    (dict(tbt_slo_ms=math.inf), "tbt_slo_ms"), (dict(seed=1.0), "seed"), (dict(hardware=3), "hardware"),
    (dict(allow_long_max_model_len="yes"), "allow_long_max_model_len"),
])
def test_engine_config_refuses_bad_values_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EngineConfig(model="x", **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    write_checkpoint(path, "LlamaForCausalLM", max_position_embeddings=MAX_MODEL_LEN)
    return path


def make_engine(path, **kwargs) -> minidu.Engine:
    """A smaller pool and an 8-token budget: chunked prefills mix with decodes."""
    return engine_helpers.make_engine(path, **(dict(num_kv_blocks=32, max_num_batched_tokens=8) | kwargs))


def all_blocks_free(engine: minidu.Engine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def test_max_model_len_past_max_position_embeddings_needs_the_override(checkpoint):
    with pytest.raises(ValueError, match="max_position_embeddings=32.*allow_long_max_model_len"):
        make_engine(checkpoint, max_model_len=64)
    assert make_engine(checkpoint, max_model_len=64, allow_long_max_model_len=True).max_model_len == 64


def test_dynamic_rope_refuses_max_model_len_past_max_position_embeddings(tmp_path):
    write_checkpoint(tmp_path, max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        make_engine(tmp_path, max_model_len=64, allow_long_max_model_len=True)


def test_request_ids_cannot_be_reused_while_alive(checkpoint):
    engine = make_engine(checkpoint)
    engine.add_request([3, 4], GREEDY, request_id="r")
    with pytest.raises(ValueError, match="'r' is already in use"):
        engine.add_request([5, 6], GREEDY, request_id="r")
    engine.add_request([3] * MAX_MODEL_LEN, GREEDY, request_id="rejected")
    with pytest.raises(ValueError, match="'rejected' is already in use"):
        engine.add_request([5, 6], GREEDY, request_id="rejected")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request([5, 6], GREEDY, request_id=7)
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request([5, 6], GREEDY, request_id="r")  # finished ids are free again


class FailingExecutor:
    """Wraps the engine's executor: raises while any request in `poison` is part of the step."""

    def __init__(self, executor, poison: set[str]):
        self.executor, self.poison = executor, poison

    def execute(self, plan):
        if any(c.seq.request_id in self.poison for c in plan_chunks(plan)):
            raise RuntimeError("injected kernel failure")
        return self.executor.execute(plan)

    def __getattr__(self, name):
        return getattr(self.executor, name)


def test_failing_step_aborts_its_requests_and_spares_the_rest(checkpoint):
    solo = make_engine(checkpoint).generate([[20, 21, 22]], GREEDY, use_tqdm=False)[0].token_ids
    engine = make_engine(checkpoint, max_num_seqs=2)
    engine.executor = FailingExecutor(engine.executor, {"bad"})
    engine.add_request([5, 6, 7], GREEDY, request_id="bad")
    engine.add_request([8, 9], GREEDY, request_id="mate")  # scheduled in the same step as "bad"
    engine.add_request([20, 21, 22], GREEDY, request_id="later")  # waits: max_num_seqs=2
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step().outputs if o.finished)
    for rid in ("bad", "mate"):
        assert outputs[rid].finish_reason == "abort"
        assert "injected kernel failure" in outputs[rid].error
    assert outputs["later"].finish_reason == "length" and outputs["later"].error is None
    assert outputs["later"].token_ids == solo
    assert all_blocks_free(engine)


PROMPT = st.lists(st.integers(0, 127), min_size=1, max_size=12)
INVALID = st.sampled_from(["too_long", "out_of_vocab", "empty", "float_token", "bad_params", "reused_id"])
REQUEST = st.one_of(PROMPT.map(lambda p: ("valid", p)), INVALID.map(lambda kind: ("invalid", kind)))


@pytest.fixture(scope="module")
def shared_engine(checkpoint):
    return make_engine(checkpoint), {}


def add_invalid(engine: minidu.Engine, kind: str, rid: str) -> str | None:
    """Adds an invalid request; returns its id if the engine took it (to fail it later), None if it raised."""
    prompts = {"too_long": [3] * MAX_MODEL_LEN, "out_of_vocab": [3, 128], "empty": [], "float_token": [3, 1.5]}
    try:
        if kind == "bad_params":
            engine.add_request([3, 4], SamplingParams(temperature=math.inf), request_id=rid)
        elif kind == "reused_id":
            engine.add_request([3, 4], GREEDY, request_id="v0")
        else:
            return engine.add_request(prompts[kind], GREEDY, request_id=rid)
    except ValueError as e:
        assert "temperature" in str(e) or "already in use" in str(e)
        return None
    raise AssertionError(f"invalid request {kind} was accepted")


@given(st.lists(REQUEST, min_size=1, max_size=5).filter(lambda r: r[0][0] == "valid"))
def test_random_mixes_of_valid_and_invalid_requests(shared_engine, requests):
    engine, solo_cache = shared_engine
    valid, invalid = {}, []
    for i, (kind, value) in enumerate(requests):
        if kind == "valid":
            valid[engine.add_request(value, GREEDY, request_id=f"v{i}")] = value
        elif (rid := add_invalid(engine, value, f"x{i}")) is not None:
            invalid.append(rid)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step().outputs if o.finished)
    for rid in invalid:
        assert outputs[rid].finish_reason == "abort" and outputs[rid].error
    for rid, prompt in valid.items():
        key = tuple(prompt)
        if key not in solo_cache:
            solo_cache[key] = make_engine(engine.config.model).generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
        assert outputs[rid].error is None and outputs[rid].token_ids == solo_cache[key]
    assert all_blocks_free(engine)
