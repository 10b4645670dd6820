"""ModelConfig parsing of HF config.json / generation_config.json, and the published presets."""
import json

import pytest
import torch

from minidu.models import MODEL_PRESETS, SUPPORTED_ARCHITECTURES, CausalLM, ModelConfig
from tests.models.checkpoints import tiny_config


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_architecture_flags_and_derived_defaults(arch):
    d = tiny_config(arch, head_dim=None, num_key_value_heads=None, rms_norm_eps=None, rope_theta=None)
    config = ModelConfig.from_hf_dict(d)
    assert config.architecture == arch
    # As in transformers: Qwen3Config's head_dim defaults to 128, the others' to hidden_size / num_attention_heads.
    assert config.head_dim == (128 if arch == "Qwen3ForCausalLM" else d["hidden_size"] // d["num_attention_heads"])
    assert config.num_key_value_heads == d["num_attention_heads"]
    assert (config.rms_norm_eps, config.rope_theta) == (1e-6, 10000.0)
    assert config.attention_bias == (arch == "Qwen2ForCausalLM")
    assert config.qk_norm == (arch == "Qwen3ForCausalLM")
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2])


def test_first_supported_architecture_is_used():
    d = tiny_config("Qwen3ForCausalLM", architectures=["MysteryForCausalLM", "Qwen3ForCausalLM"])
    assert ModelConfig.from_hf_dict(d).architecture == "Qwen3ForCausalLM"


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict(tiny_config(architectures=["GPT2LMHeadModel"]))


@pytest.mark.parametrize("overrides, key", [
    (dict(hidden_size=None), "hidden_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(intermediate_size="96"), "intermediate_size"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=None, hidden_size=66, num_attention_heads=4), "head_dim"),
    (dict(head_dim=15), "head_dim"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id"),
    (dict(bos_token_id=[1, 2]), "bos_token_id"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 4.0}), "rope_scaling.*longrope"),
    (dict(rope_parameters={"rope_type": "su", "rope_theta": 1e4}), "rope_parameters.*su"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}), "low_freq_factor"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": "x"}), "mscale"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), "quantization_config.*awq"),
    (dict(rope_scaling=[1.0]), "rope_scaling"),
    (dict(attention_bias="yes"), "attention_bias"),
    (dict(mlp_bias=1), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(architectures="LlamaForCausalLM"), "architectures"),
])
def test_bad_values_name_the_source_and_key(overrides, key):
    with pytest.raises(ValueError, match=rf"my/config\.json.*{key}"):
        ModelConfig.from_hf_dict(tiny_config(**overrides), "my/config.json")


def test_legacy_rope_type_key_and_default_scaling():
    linear = ModelConfig.from_hf_dict(tiny_config(rope_scaling={"type": "linear", "factor": 2.0}))
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert ModelConfig.from_hf_dict(tiny_config(rope_scaling={"rope_type": "default"})).rope_scaling is None


def write_json(path, name, value):
    (path / name).write_text(json.dumps(value))


@pytest.mark.parametrize("generation_eos, expected", [(5, [5]), ([7, 2], [7, 2]), (None, [2])])
def test_generation_config_eos_overrides_config(tmp_path, generation_eos, expected):
    write_json(tmp_path, "config.json", tiny_config(eos_token_id=2))
    write_json(tmp_path, "generation_config.json", {"bos_token_id": 9, "eos_token_id": generation_eos})
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.eos_token_ids == expected
    assert config.bos_token_id == 9


def test_without_generation_config_eos_comes_from_config(tmp_path):
    write_json(tmp_path, "config.json", tiny_config(eos_token_id=[2, 3]))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == [2, 3]


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("name, text", [("config.json", "{not json"), ("config.json", "[1, 2]"),
                                        ("generation_config.json", "{\"eos_token_id\": ")])
def test_malformed_json_names_the_file(tmp_path, name, text):
    write_json(tmp_path, "config.json", tiny_config())
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        ModelConfig.from_pretrained(tmp_path)


# Published sizes (model cards): total parameters, in billions, including embeddings once when tied.
PUBLISHED_BILLIONS = {"qwen3-0.6b": 0.596, "qwen3-1.7b": 1.72, "qwen3-8b": 8.19, "qwen3-14b": 14.77,
                      "llama-3.1-8b": 8.03, "llama-3.2-1b": 1.236, "qwen2.5-0.5b": 0.494}


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_presets_build_models_of_the_published_size(name):
    config = ModelConfig.from_hf_dict(MODEL_PRESETS[name], name)
    model = CausalLM(config, torch.bfloat16, "meta")  # shapes only, no memory
    billions = sum(t.numel() for _, t in model.named_weights()) / 1e9
    assert billions == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01)
    assert config.eos_token_ids and config.torch_dtype == "bfloat16"


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
@pytest.mark.parametrize("overrides, key", [
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding_attention"),
    (dict(layer_types=["full_attention"]), "layer_types"),
])
def test_sliding_window_attention_is_refused(arch, overrides, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf_dict(tiny_config(arch, **overrides))


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_sliding_window_that_applies_to_no_layer_is_full_attention(arch):
    # transformers: sliding layers are those from max_window_layers on, and there are only 2 here.
    d = tiny_config(arch, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert ModelConfig.from_hf_dict(d) == ModelConfig.from_hf_dict(tiny_config(arch))


def test_rope_parameters_layout_equals_legacy_layout():
    rope = {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    v5 = tiny_config(rope_theta=None, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **rope})
    legacy = tiny_config(rope_theta=5e5, rope_scaling={"type": "llama3", **rope})
    config = ModelConfig.from_hf_dict(v5)
    assert config == ModelConfig.from_hf_dict(legacy)
    assert (config.rope_theta, config.rope_scaling) == (5e5, {"rope_type": "llama3", **rope})


def test_bias_switches_follow_the_architecture():
    llama = ModelConfig.from_hf_dict(tiny_config(attention_bias=True, mlp_bias=True))
    assert (llama.attention_bias, llama.o_proj_bias, llama.mlp_bias) == (True, True, True)
    # Qwen2's config class has neither key: always q/k/v biases only. Qwen3's has attention_bias but no mlp_bias.
    qwen2 = ModelConfig.from_hf_dict(tiny_config("Qwen2ForCausalLM", attention_bias=False, mlp_bias=True))
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.mlp_bias) == (True, False, False)
    qwen3 = ModelConfig.from_hf_dict(tiny_config("Qwen3ForCausalLM", attention_bias=True, mlp_bias=True))
    assert (qwen3.attention_bias, qwen3.o_proj_bias, qwen3.mlp_bias) == (True, True, False)
