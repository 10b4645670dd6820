"""transformers itself as the reference: tiny random checkpoints written by transformers' own config classes and
save_pretrained (in its 5.x rope_parameters layout and rewritten in the legacy 4.x layout) must give transformers'
first-step logits and greedy tokens, through the engine's chunked prefill, mixed batches and prefix-cache hits."""
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

import minidu  # noqa: E402
from minidu import SamplingParams  # noqa: E402
from minidu.kernels.rotary import rope_attention_factor, rope_inv_freq  # noqa: E402
from minidu.models import ModelConfig, load_model  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.models.paged import PagedRunner  # noqa: E402
from tests.models.checkpoints import STORIES260K

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {
    "llama-llama3-tied-gqa": ("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "llama-biases-yarn": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, rope_parameters=YARN)),
    "llama-dynamic": ("LlamaConfig", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0,
                                                           "factor": 2.0})),
    "qwen2-bias-theta1e6": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-headdim32-linear": ("Qwen3Config", dict(head_dim=32, rope_parameters={
        "rope_type": "linear", "rope_theta": 1e6, "factor": 2.0})),
}
# Prompts of different lengths; the last shares the first's 8-token prefix (two blocks of 4: a prefix-cache hit).
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4, 40], [20, 21, 22, 23, 24, 25, 26], [5, 6, 7, 8, 9, 10, 11, 12, 50]]
NUM_TOKENS = 4
# fp32 Triton kernels against transformers' fp32 eager model: |error| <= 1e-4 * max|logit|.
FP32_RTOL = 1e-4


def randomize(model, seed: int) -> None:
    """O(1) activations and logits (transformers' own init gives near-zero biases and tiny logits)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def to_legacy_layout(path: Path) -> None:
    """Rewrites config.json as transformers 4.x wrote it: top-level rope_theta, rope_scaling with "type", torch_dtype."""
    config = json.loads((path / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    config["torch_dtype"] = config.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(transformers model, {layout: checkpoint dir}) of one variant."""
    config_class, overrides = VARIANTS[request.param]
    config = getattr(transformers, config_class)(**TINY, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed=len(request.param))
    dirs = {}
    for layout in ("v5", "legacy"):
        dirs[layout] = tmp_path_factory.mktemp(f"{request.param}-{layout}")
        model.save_pretrained(dirs[layout])
    to_legacy_layout(dirs["legacy"])
    return model, dirs


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_transformers_reads_the_legacy_layout_the_same(checkpoint):
    model, dirs = checkpoint
    legacy = transformers.AutoConfig.from_pretrained(dirs["legacy"])
    assert {k: v for k, v in legacy.rope_parameters.items() if k != "type"} == model.config.rope_parameters
    assert ModelConfig.from_pretrained(dirs["legacy"]) == ModelConfig.from_pretrained(dirs["v5"])


def test_first_step_logits_match_transformers(checkpoint):
    model, dirs = checkpoint
    lm, _, _ = load_model(str(dirs["v5"]), dtype="float32", device=DEVICE)
    runner = PagedRunner(lm, block_size=4, num_blocks=16, max_blocks=4)
    logits, rows = runner.step([("a", PROMPTS[0])], [])
    with torch.no_grad():
        expected = model(torch.tensor([PROMPTS[0]])).logits[0]
    assert [p for _, p in rows] == list(range(len(PROMPTS[0])))
    assert torch.allclose(logits.double(), expected.double(), rtol=0, atol=FP32_RTOL * expected.abs().max().item())


def test_engine_greedy_tokens_match_transformers(checkpoint):
    """On the 5.x layout only: the legacy layout reads to an equal ModelConfig (checked above)."""
    model, dirs = checkpoint
    # 6-token budget: the long prompts prefill in chunks that share steps with the others' decodes.
    engine = minidu.Engine(str(dirs["v5"]), num_kv_blocks=32, block_size=4, max_num_seqs=4,
                           max_num_batched_tokens=6)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    first = engine.generate(PROMPTS[:3], params, use_tqdm=False)
    last = engine.generate(PROMPTS[3:], params, use_tqdm=False)
    assert engine.scheduler.block_manager.num_free_blocks == 32
    assert [o.token_ids for o in first + last] == [hf_greedy(model, p, NUM_TOKENS) for p in PROMPTS]


ROPE_CASES = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {**LLAMA3, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
     "truncate": False},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0,
     "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": 1.3},
]


@pytest.mark.parametrize("rope", ROPE_CASES, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items())[:60])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_rope_frequencies_and_scale_match_transformers(rope, head_dim):
    hf_config = transformers.LlamaConfig(**{**TINY, "head_dim": head_dim},
                                         rope_parameters={"rope_theta": 50000.0, **rope})
    hf_rope = LlamaRotaryEmbedding(hf_config)
    config = ModelConfig.from_hf_dict({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    assert torch.allclose(inv_freq, hf_rope.inv_freq, rtol=1e-6, atol=0)
    assert rope_attention_factor(config.rope_scaling) == pytest.approx(hf_rope.attention_scaling, rel=1e-12)




@pytest.mark.skipif(not STORIES260K.is_dir(), reason="needs ../shared/models/stories260k")
def test_stories260k_greedy_story_matches_transformers():
    engine = minidu.Engine(str(STORIES260K), num_kv_blocks=16, max_num_seqs=2)
    out = engine.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()
    expected = hf_greedy(model, out.prompt_token_ids, len(out.token_ids))
    assert out.token_ids == expected
    # The story's text continues the prompt (its SentencePiece spaces survive the streaming decode).
    prompt_text = engine.tokenizer.decode(out.prompt_token_ids)
    assert prompt_text + out.text == engine.tokenizer.decode(out.prompt_token_ids + out.token_ids)
    assert " there was" in out.text
