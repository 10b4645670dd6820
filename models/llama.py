"""One decoder for Llama, Qwen2 and Qwen3 causal LMs whose every arithmetic op runs in a minidu Triton kernel.

q/k/v and gate/up are fused into single GEMM weights at load time; PyTorch only allocates tensors and takes views.
"""
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from minidu.kernels.gather import gather_rows
from minidu.kernels.gemm import gemm
from minidu.kernels.rmsnorm import rms_norm
from minidu.kernels.rotary import rope_attention_factor, rope_inv_freq, rotary_embedding_and_store_kvcache
from minidu.kernels.platform import interpreter_blas
from minidu.kernels.utils import FLOAT_DTYPES
from minidu.models.attention import AttentionMetadata, paged_attention
from minidu.models.config import ModelConfig
from minidu.models.parallel import TensorParallel

# Checkpoint tensors that carry no weights (some exporters save the rotary buffer).
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(slots=True)
class DecoderLayer:
    input_norm: torch.Tensor  # [H]
    qkv_proj: torch.Tensor  # [(Hq + 2 * Hk) * D, H]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 * Hk) * D], Qwen2 or attention_bias
    q_norm: torch.Tensor | None  # [D], Qwen3 only
    k_norm: torch.Tensor | None  # [D], Qwen3 only
    o_proj: torch.Tensor  # [H, Hq * D]
    o_bias: torch.Tensor | None  # [H], Llama/Qwen3 attention_bias
    post_attention_norm: torch.Tensor  # [H]
    gate_up_proj: torch.Tensor  # [2 * I, H]
    gate_up_bias: torch.Tensor | None  # [2 * I], Llama mlp_bias
    down_proj: torch.Tensor  # [H, I]
    down_bias: torch.Tensor | None  # [H], Llama mlp_bias


class CausalLM:
    """Decoder-only LM over a paged KV cache: forward() gives final-normed hidden states, compute_logits() logits."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 tp: TensorParallel = TensorParallel()):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype!r}")
        self.config, self.dtype, self.device, self.tp = config, dtype, torch.device(device), tp
        c = config
        self.num_kv_heads = c.num_key_value_heads  # this rank's: what its KV cache holds
        qkv_rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        self.embed_tokens = self._empty(c.vocab_size, c.hidden_size)
        self.layers = [
            DecoderLayer(
                input_norm=self._empty(c.hidden_size),
                qkv_proj=self._empty(qkv_rows, c.hidden_size),
                qkv_bias=self._empty(qkv_rows) if c.attention_bias else None,
                q_norm=self._empty(c.head_dim) if c.qk_norm else None,
                k_norm=self._empty(c.head_dim) if c.qk_norm else None,
                o_proj=self._empty(c.hidden_size, c.num_attention_heads * c.head_dim),
                o_bias=self._empty(c.hidden_size) if c.o_proj_bias else None,
                post_attention_norm=self._empty(c.hidden_size),
                gate_up_proj=self._empty(2 * c.intermediate_size, c.hidden_size),
                gate_up_bias=self._empty(2 * c.intermediate_size) if c.mlp_bias else None,
                down_proj=self._empty(c.hidden_size, c.intermediate_size),
                down_bias=self._empty(c.hidden_size) if c.mlp_bias else None,
            )
            for _ in range(c.num_hidden_layers)
        ]
        self.norm = self._empty(c.hidden_size)
        self.lm_head = self.embed_tokens if c.tie_word_embeddings else self._empty(c.vocab_size, c.hidden_size)
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(self.device)
        self.rope_attention_factor = rope_attention_factor(c.rope_scaling)
        self.scale = c.head_dim ** -0.5

    def _empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def weight_targets(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> the (view of the fused) tensor it loads into, in checkpoint order."""
        c = self.config
        q_rows, kv_rows = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        qkv_split = {"q_proj": slice(0, q_rows), "k_proj": slice(q_rows, q_rows + kv_rows),
                     "v_proj": slice(q_rows + kv_rows, q_rows + 2 * kv_rows)}
        gate_up_split = {"gate_proj": slice(0, c.intermediate_size),
                         "up_proj": slice(c.intermediate_size, 2 * c.intermediate_size)}
        targets = {"model.embed_tokens.weight": self.embed_tokens}
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            targets[prefix + "input_layernorm.weight"] = layer.input_norm
            for proj, rows in qkv_split.items():
                targets[f"{prefix}self_attn.{proj}.weight"] = layer.qkv_proj[rows]
                if layer.qkv_bias is not None:
                    targets[f"{prefix}self_attn.{proj}.bias"] = layer.qkv_bias[rows]
            if layer.q_norm is not None:
                targets[prefix + "self_attn.q_norm.weight"] = layer.q_norm
                targets[prefix + "self_attn.k_norm.weight"] = layer.k_norm
            targets[prefix + "self_attn.o_proj.weight"] = layer.o_proj
            if layer.o_bias is not None:
                targets[prefix + "self_attn.o_proj.bias"] = layer.o_bias
            targets[prefix + "post_attention_layernorm.weight"] = layer.post_attention_norm
            for proj, rows in gate_up_split.items():
                targets[f"{prefix}mlp.{proj}.weight"] = layer.gate_up_proj[rows]
                if layer.gate_up_bias is not None:
                    targets[f"{prefix}mlp.{proj}.bias"] = layer.gate_up_bias[rows]
            targets[prefix + "mlp.down_proj.weight"] = layer.down_proj
            if layer.down_bias is not None:
                targets[prefix + "mlp.down_proj.bias"] = layer.down_bias
        targets["model.norm.weight"] = self.norm
        if not self.config.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head
        return targets

    def load_state_dict(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors into the (fused) weights, converting dtype; every weight must be given once."""
        targets = self.weight_targets()
        loaded: set[str] = set()
        for name, tensor in named_tensors:
            target = targets.get(name)
            if target is None:
                # Tied checkpoints sometimes still save lm_head.weight: a copy of the embedding.
                if name.endswith(_HARMLESS_SUFFIXES) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                    continue
                raise ValueError(f"unexpected weight tensor {name!r} (not part of {self.config.architecture})")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"weight tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(tensor)
            if not bool(torch.isfinite(target).all()):
                # NaN/inf weights make every logit NaN, which samples as token 0 without a word.
                raise ValueError(f"weight tensor {name!r} holds NaN or infinite values")
            loaded.add(name)
        missing = [name for name in targets if name not in loaded]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"missing weight tensor {missing[0]!r}{more}")

    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Dummy weights from the config alone: N(0, std) matrices and biases, norm weights N(1, std)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for name, target in self.weight_targets().items():
            mean = 1.0 if name.endswith("norm.weight") else 0.0
            target.normal_(mean, std, generator=generator)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_sms: int | None = None) -> torch.Tensor:
        """input_ids [T], positions [T] -> final-normed hidden states [T, H]; writes the tokens' k/v to kv_caches."""
        assert len(kv_caches) == len(self.layers), "one (k_cache, v_cache) pair per layer"
        with interpreter_blas():
            return self._forward(input_ids, positions, attn, kv_caches, num_sms)

    def _forward(self, input_ids, positions, attn, kv_caches, num_sms) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        residual = gather_rows(input_ids, self.embed_tokens, num_sms=num_sms)
        x = rms_norm(residual, self.layers[0].input_norm, eps, num_sms=num_sms)
        # Each residual add and the norm after it run as the epilogue of the GEMM before them (o_proj, down_proj).
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm, (k_cache, v_cache) in zip(self.layers, next_norms, kv_caches):
            residual, x = self._attention(layer, x, residual, positions, attn, k_cache, v_cache, num_sms)
            residual, x = self._mlp(layer, x, residual, next_norm, num_sms)
        return x

    def _attention(self, layer: DecoderLayer, x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                   attn: AttentionMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   num_sms: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        num_tokens, head_dim = x.shape[0], c.head_dim
        q_size, kv_size = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        qkv = gemm(x, layer.qkv_proj, layer.qkv_bias, num_sms=num_sms)
        q = qkv[:, :q_size].view(num_tokens, c.num_attention_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(num_tokens, c.num_key_value_heads, head_dim)
        v = qkv[:, q_size + kv_size:].view(num_tokens, c.num_key_value_heads, head_dim)
        if layer.q_norm is not None:
            # Per-head norms in place on the strided views, so q and k stay inside the fused buffer.
            rms_norm(q, layer.q_norm, c.rms_norm_eps, num_sms=num_sms, out=q)
            rms_norm(k, layer.k_norm, c.rms_norm_eps, num_sms=num_sms, out=k)
        rotary_embedding_and_store_kvcache(q, k, v, positions, self.inv_freq, k_cache, v_cache, attn.slot_mapping,
                                           attention_factor=self.rope_attention_factor, num_sms=num_sms)
        out = paged_attention(q, k_cache, v_cache, attn, scale=self.scale, num_sms=num_sms)
        return gemm(out.view(num_tokens, q_size), layer.o_proj, layer.o_bias, residual=residual,
                    norm_weight=layer.post_attention_norm, eps=c.rms_norm_eps, num_sms=num_sms)

    def _mlp(self, layer: DecoderLayer, x: torch.Tensor, residual: torch.Tensor, next_norm: torch.Tensor,
             num_sms: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up = gemm(x, layer.gate_up_proj, layer.gate_up_bias, num_sms=num_sms)
        return gemm(gate_up, layer.down_proj, layer.down_bias, num_sms=num_sms, silu_mul=True, residual=residual,
                    norm_weight=next_norm, eps=self.config.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor, num_sms: int | None = None) -> torch.Tensor:
        """hidden [B, H] (already final-normed by forward) -> logits [B, V] via the lm_head GEMM."""
        with interpreter_blas():
            return gemm(hidden, self.lm_head, num_sms=num_sms)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's own (fused) tensors, each once; e.g. for counting weight bytes."""
        yield "embed_tokens", self.embed_tokens
        for i, layer in enumerate(self.layers):
            for field in DecoderLayer.__slots__:
                tensor = getattr(layer, field)
                if tensor is not None:
                    yield f"layers.{i}.{field}", tensor
        yield "norm", self.norm
        if not self.config.tie_word_embeddings:
            yield "lm_head", self.lm_head
