"""Writes tiny random Hugging Face-style checkpoints (config.json, generation_config.json, safetensors weights,
optionally a character-level tokenizer) for tests anywhere in the project:
`write_checkpoint(tmp_path, "Qwen3ForCausalLM")`; and where the real stories260k checkpoint lies (`STORIES260K`,
in ../shared beside the repository, or under $MINIDU_SHARED; tests that use it skip when it is absent)."""
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

STORIES260K = Path(os.environ.get("MINIDU_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "models" / "stories260k"

# hidden 64, 2 layers, 4 query heads sharing 2 kv heads, vocab 128, fp32.
_TINY_COMMON = {
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_CONFIGS = {
    "LlamaForCausalLM": {**_TINY_COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                         "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False},
    "Qwen2ForCausalLM": {**_TINY_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                         "rms_norm_eps": 1e-6},
    # head_dim 32 is wider than hidden / heads = 16, as Qwen3 allows.
    "Qwen3ForCausalLM": {**_TINY_COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                         "rms_norm_eps": 1e-6, "head_dim": 32, "attention_bias": False},
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tiny_config(arch: str = "LlamaForCausalLM", **overrides) -> dict:
    """The tiny HF config dict of `arch` with `overrides` applied; an override of None removes the key."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch must be one of {list(TINY_CONFIGS)}, got {arch!r}")
    config = {**TINY_CONFIGS[arch], **overrides}
    return {key: value for key, value in config.items() if value is not None}


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights for `config`, scaled so activations and logits are O(1) (a demanding comparison)."""
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    arch = config["architectures"][0]

    def linear(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / math.sqrt(cols)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=generator)

    weights = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], hidden, generator=generator)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm(hidden)
        for proj, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            weights[f"{p}self_attn.{proj}.weight"] = linear(n * head_dim, hidden)
            if arch == "Qwen2ForCausalLM" or config.get("attention_bias"):
                weights[f"{p}self_attn.{proj}.bias"] = 0.5 * torch.randn(n * head_dim, generator=generator)
        if arch == "Qwen3ForCausalLM":
            weights[p + "self_attn.q_norm.weight"] = norm(head_dim)
            weights[p + "self_attn.k_norm.weight"] = norm(head_dim)
        weights[p + "self_attn.o_proj.weight"] = linear(hidden, heads * head_dim)
        if config.get("attention_bias") and arch != "Qwen2ForCausalLM":  # Llama's and Qwen3's switch covers o_proj
            weights[p + "self_attn.o_proj.bias"] = 0.5 * torch.randn(hidden, generator=generator)
        weights[p + "post_attention_layernorm.weight"] = norm(hidden)
        weights[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = linear(hidden, inter)
        for proj, size in (("gate_proj", inter), ("up_proj", inter), ("down_proj", hidden)):
            if config.get("mlp_bias") and arch == "LlamaForCausalLM":
                weights[f"{p}mlp.{proj}.bias"] = 0.5 * torch.randn(size, generator=generator)
    weights["model.norm.weight"] = norm(hidden)
    if not config.get("tie_word_embeddings", False):
        weights["lm_head.weight"] = linear(config["vocab_size"], hidden)
    dtype = _DTYPES[config.get("torch_dtype", "float32")]
    return {name: t.to(dtype).contiguous() for name, t in weights.items()}


def save_weights(path: Path, weights: dict[str, torch.Tensor], num_shards: int = 1) -> None:
    """model.safetensors, or num_shards files plus model.safetensors.index.json as HF writes them."""
    if num_shards == 1:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[shard::num_shards]
        save_file({n: weights[n] for n in chunk}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level tokenizer.json: ids 0-2 are <unk> <s> </s>, then printable ASCII, then filler tokens up to
    vocab_size so every id decodes; encoding prepends <s> as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, processors

    chars = [chr(c) for c in range(32, 127)]
    if vocab_size < len(SPECIAL_TOKENS) + len(chars):
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + len(chars)} for the tokenizer, "
                         f"got {vocab_size}")
    tokens = SPECIAL_TOKENS + chars
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}, indent=2))


def write_checkpoint(path: str | Path, arch: str = "LlamaForCausalLM", *, seed: int = 0, num_shards: int = 1,
                     tokenizer: bool = False, **overrides) -> dict:
    """Writes a tiny random checkpoint of `arch` into directory `path` (created if needed); returns its config dict.

    `overrides` replace config.json keys (None removes one). generation_config.json repeats the eos/bos ids;
    num_shards > 1 writes a sharded checkpoint with an index; tokenizer=True adds tokenizer.json (vocab_size >= 98).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **overrides)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_weights(path, random_weights(config, seed), num_shards)
    if tokenizer:
        write_tokenizer(path, config["vocab_size"])
    return config
