"""Float64 reference decoder for Llama / Qwen2 / Qwen3 written from the HF configs and model definitions, independently
of minidu.models: plain dense causal attention over one whole sequence, no cache, no fusion."""
import math

import torch


def rope_frequencies(config: dict) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2] in float64, with linear or Llama-3 scaling applied per frequency."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config.get("rope_theta", 10000.0)
    freqs = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        freqs = [f / scaling["factor"] for f in freqs]
    elif kind == "llama3":
        freqs = [_llama3_frequency(f, scaling) for f in freqs]
    else:
        assert kind == "default", kind
    return torch.tensor(freqs, dtype=torch.float64)


def _llama3_frequency(freq: float, s: dict) -> float:
    # Meta's rule: keep short wavelengths, divide long ones by `factor`, interpolate linearly in between.
    wavelength = 2 * math.pi / freq
    context = s["original_max_position_embeddings"]
    if wavelength < context / s["high_freq_factor"]:
        return freq
    if wavelength > context / s["low_freq_factor"]:
        return freq / s["factor"]
    smooth = (context / wavelength - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    return (1 - smooth) * freq / s["factor"] + smooth * freq


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [L, heads, D]; pairs are (i, i + D/2) ("rotate half").
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q [L, Hq, D], k/v [L, Hk, D]; query head h reads kv head h // (Hq // Hk).
    length, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(length, num_heads * head_dim)


def reference_logits(config: dict, weights: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab] in float64 of the HF config dict `config` with HF-named `weights`."""
    w = {name: t.detach().to("cpu", torch.float64) for name, t in weights.items()}
    arch = config["architectures"][0]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    eps = config.get("rms_norm_eps", 1e-6)
    angles = torch.arange(len(tokens), dtype=torch.float64)[:, None] * rope_frequencies(config)[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def proj(x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = proj(h, p + "self_attn.q_proj").view(len(tokens), heads, head_dim)
        k = proj(h, p + "self_attn.k_proj").view(len(tokens), kv_heads, head_dim)
        v = proj(h, p + "self_attn.v_proj").view(len(tokens), kv_heads, head_dim)
        if arch == "Qwen3ForCausalLM":
            q = _rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        attn = _attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v)
        x = x + proj(attn, p + "self_attn.o_proj")
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + proj(torch.nn.functional.silu(proj(h, p + "mlp.gate_proj")) * proj(h, p + "mlp.up_proj"),
                     p + "mlp.down_proj")
    x = _rms_norm(x, w["model.norm.weight"], eps)
    lm_head = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ lm_head.T
