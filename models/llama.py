"""One decoder for Llama, Qwen2 and Qwen3 causal LMs whose every arithmetic op runs in a minidu Triton kernel.

q/k/v and gate/up are fused into single GEMM weights at load time; PyTorch only allocates tensors and takes views.
Under tensor parallelism each rank holds its Megatron shard (parallel.RankLayout): q/k/v and gate/up split by output
rows, o and down by input columns and all-reduced, the embedding and LM head by vocabulary rows.
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
from minidu.models.parallel import CheckpointTensor, RankLayout, Shard, TensorParallel, all_reduce, gather_vocab

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


def _whole(tensor: torch.Tensor) -> tuple[torch.Tensor, Shard]:
    """A target every rank holds whole (norms, row-parallel biases)."""
    return tensor, Shard(tuple(tensor.shape))


def _column_parallel(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None,
                     parts: list[tuple[str, int, int, int]]) -> dict[str, tuple[torch.Tensor, Shard]]:
    """Fused output rows: each (projection, its checkpoint rows, first row of this rank's shard, shard rows) fills the
    next rows of weight (and bias)."""
    targets, first = {}, 0
    for proj, full_rows, start, count in parts:
        rows = slice(first, first + count)
        targets[f"{prefix}{proj}.weight"] = weight[rows], Shard.slice((full_rows, weight.shape[1]), 0, start, count)
        if bias is not None:
            targets[f"{prefix}{proj}.bias"] = bias[rows], Shard.slice((full_rows,), 0, start, count)
        first += count
    return targets


def _row_parallel(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None, full_cols: int,
                  start: int) -> dict[str, tuple[torch.Tensor, Shard]]:
    """This rank's input columns of the weight; the bias is whole on every rank and added on rank 0 only."""
    targets = {prefix + "weight": (weight, Shard.slice((weight.shape[0], full_cols), 1, start, weight.shape[1]))}
    if bias is not None:
        targets[prefix + "bias"] = _whole(bias)
    return targets


class CausalLM:
    """Decoder-only LM over a paged KV cache: forward() gives final-normed hidden states, compute_logits() logits."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 tp: TensorParallel = TensorParallel()):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype!r}")
        self.config, self.dtype, self.device, self.tp = config, dtype, torch.device(device), tp
        c = config
        self.layout = layout = RankLayout.of(config, tp)
        self.num_heads = layout.num_heads
        self.num_kv_heads = layout.num_kv_heads  # this rank's: what its KV cache holds
        qkv_rows = (layout.num_heads + 2 * layout.num_kv_heads) * c.head_dim
        inter = layout.intermediate_size
        self.embed_tokens = self._vocab_table()
        self.layers = [
            DecoderLayer(
                input_norm=self._empty(c.hidden_size),
                qkv_proj=self._empty(qkv_rows, c.hidden_size),
                qkv_bias=self._empty(qkv_rows) if c.attention_bias else None,
                q_norm=self._empty(c.head_dim) if c.qk_norm else None,
                k_norm=self._empty(c.head_dim) if c.qk_norm else None,
                o_proj=self._empty(c.hidden_size, layout.num_heads * c.head_dim),
                o_bias=self._empty(c.hidden_size) if c.o_proj_bias else None,
                post_attention_norm=self._empty(c.hidden_size),
                gate_up_proj=self._empty(2 * inter, c.hidden_size),
                gate_up_bias=self._empty(2 * inter) if c.mlp_bias else None,
                down_proj=self._empty(c.hidden_size, inter),
                down_bias=self._empty(c.hidden_size) if c.mlp_bias else None,
            )
            for _ in range(c.num_hidden_layers)
        ]
        self.norm = self._empty(c.hidden_size)
        self.lm_head = self.embed_tokens if c.tie_word_embeddings else self._vocab_table()
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(self.device)
        self.rope_attention_factor = rope_attention_factor(c.rope_scaling)
        self.scale = c.head_dim ** -0.5

    def _empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def _vocab_table(self) -> torch.Tensor:
        """[vocab, H] at size 1; else this rank's vocab_rows, zeroed: the last shard's padding rows give logits that
        gather_vocab drops."""
        if self.tp.size == 1:
            return self._empty(self.config.vocab_size, self.config.hidden_size)
        return torch.zeros(self.layout.vocab_rows, self.config.hidden_size, dtype=self.dtype, device=self.device)

    def weight_targets(self) -> dict[str, tuple[torch.Tensor, Shard]]:
        """HF tensor name -> (the (view of the fused) tensor it loads into, the shard of the checkpoint tensor that
        this rank holds there), in checkpoint order."""
        c, s = self.config, self.layout
        vocab = Shard.slice((c.vocab_size, c.hidden_size), 0, s.vocab_start, s.vocab_stop - s.vocab_start)
        targets = {"model.embed_tokens.weight": (self.embed_tokens[:vocab.shape[0]], vocab)}
        for i, layer in enumerate(self.layers):
            targets |= self._layer_targets(f"model.layers.{i}.", layer)
        targets["model.norm.weight"] = _whole(self.norm)
        if not c.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head[:vocab.shape[0]], vocab
        return targets

    def _layer_targets(self, prefix: str, layer: DecoderLayer) -> dict[str, tuple[torch.Tensor, Shard]]:
        c, s, rank = self.config, self.layout, self.tp.rank
        q_rows, kv_rows, inter = s.num_heads * c.head_dim, s.num_kv_heads * c.head_dim, s.intermediate_size
        q_full, kv_full, kv_start = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
            s.kv_head_start * c.head_dim
        targets = {prefix + "input_layernorm.weight": _whole(layer.input_norm)}
        targets |= _column_parallel(prefix + "self_attn.", layer.qkv_proj, layer.qkv_bias, [
            ("q_proj", q_full, rank * q_rows, q_rows), ("k_proj", kv_full, kv_start, kv_rows),
            ("v_proj", kv_full, kv_start, kv_rows)])
        if layer.q_norm is not None:
            targets[prefix + "self_attn.q_norm.weight"] = _whole(layer.q_norm)
            targets[prefix + "self_attn.k_norm.weight"] = _whole(layer.k_norm)
        targets |= _row_parallel(prefix + "self_attn.o_proj.", layer.o_proj, layer.o_bias, q_full, rank * q_rows)
        targets[prefix + "post_attention_layernorm.weight"] = _whole(layer.post_attention_norm)
        targets |= _column_parallel(prefix + "mlp.", layer.gate_up_proj, layer.gate_up_bias, [
            ("gate_proj", c.intermediate_size, rank * inter, inter), ("up_proj", c.intermediate_size, rank * inter, inter)])
        targets |= _row_parallel(prefix + "mlp.down_proj.", layer.down_proj, layer.down_bias, c.intermediate_size,
                                 rank * inter)
        return targets

    def load_state_dict(self, named_tensors: Iterable[tuple[str, torch.Tensor | CheckpointTensor]]) -> None:
        """Copies this rank's shard of HF-named checkpoint tensors into the (fused) weights, converting dtype; every
        weight must be given once. A CheckpointTensor is read for the shard only; a tensor is sliced."""
        targets = self.weight_targets()
        loaded: set[str] = set()
        for name, tensor in named_tensors:
            entry = targets.get(name)
            if entry is None:
                # Tied checkpoints sometimes still save lm_head.weight: a copy of the embedding.
                if name.endswith(_HARMLESS_SUFFIXES) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                    continue
                raise ValueError(f"unexpected weight tensor {name!r} (not part of {self.config.architecture})")
            target, shard = entry
            if tuple(tensor.shape) != shard.full_shape:
                raise ValueError(f"weight tensor {name!r} has shape {tuple(tensor.shape)}, expected {shard.full_shape}")
            part = tensor[shard.index()] if isinstance(tensor, torch.Tensor) else tensor.read(shard)
            if tuple(part.shape) != tuple(target.shape):  # copy_ would broadcast a wrong-sized read silently
                raise ValueError(f"reading rank {self.tp.rank}'s shard of weight tensor {name!r} gave shape "
                                 f"{tuple(part.shape)}, expected {tuple(target.shape)}")
            target.copy_(part)
            # A finite sum proves every element finite (any NaN or inf makes it NaN or inf) at a tenth of the cost of
            # isfinite over the tensor; only a sum that overflows needs the element-wise look.
            if not bool(torch.isfinite(target.sum())) and not bool(torch.isfinite(target).all()):
                # NaN/inf weights make every logit NaN, which samples as token 0 without a word.
                raise ValueError(f"weight tensor {name!r} holds NaN or infinite values")
            loaded.add(name)
        missing = [name for name in targets if name not in loaded]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"missing weight tensor {missing[0]!r}{more}")

    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Dummy weights from the config alone: N(0, std) matrices and biases, norm weights N(1, std). Each rank draws
        every full tensor and keeps its shard, so the model is the same whatever the number of ranks."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for name, (target, shard) in self.weight_targets().items():
            mean = 1.0 if name.endswith("norm.weight") else 0.0
            if shard.dim is None:
                target.normal_(mean, std, generator=generator)
            else:
                full = torch.empty(shard.full_shape, dtype=self.dtype, device=self.device)
                target.copy_(full.normal_(mean, std, generator=generator)[shard.index()])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_sms: int | None = None) -> torch.Tensor:
        """input_ids [T], positions [T] -> final-normed hidden states [T, H]; writes the tokens' k/v to kv_caches."""
        assert len(kv_caches) == len(self.layers), "one (k_cache, v_cache) pair per layer"
        with interpreter_blas():
            return self._forward(input_ids, positions, attn, kv_caches, num_sms)

    def _forward(self, input_ids, positions, attn, kv_caches, num_sms) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        residual = self._embed(input_ids, num_sms)
        x = rms_norm(residual, self.layers[0].input_norm, eps, num_sms=num_sms)
        # Each residual add and the norm after it follow the GEMM before them (o_proj, down_proj): see _row_parallel.
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
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        qkv = gemm(x, layer.qkv_proj, layer.qkv_bias, num_sms=num_sms)
        q = qkv[:, :q_size].view(num_tokens, self.num_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(num_tokens, self.num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size:].view(num_tokens, self.num_kv_heads, head_dim)
        if layer.q_norm is not None:
            # Per-head norms in place on the strided views, so q and k stay inside the fused buffer.
            rms_norm(q, layer.q_norm, c.rms_norm_eps, num_sms=num_sms, out=q)
            rms_norm(k, layer.k_norm, c.rms_norm_eps, num_sms=num_sms, out=k)
        rotary_embedding_and_store_kvcache(q, k, v, positions, self.inv_freq, k_cache, v_cache, attn.slot_mapping,
                                           attention_factor=self.rope_attention_factor, num_sms=num_sms)
        out = paged_attention(q, k_cache, v_cache, attn, scale=self.scale, num_sms=num_sms)
        return self._row_parallel(out.view(num_tokens, q_size), layer.o_proj, layer.o_bias, residual,
                                  layer.post_attention_norm, num_sms)

    def _mlp(self, layer: DecoderLayer, x: torch.Tensor, residual: torch.Tensor, next_norm: torch.Tensor,
             num_sms: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up = gemm(x, layer.gate_up_proj, layer.gate_up_bias, num_sms=num_sms)
        return self._row_parallel(gate_up, layer.down_proj, layer.down_bias, residual, next_norm, num_sms, silu_mul=True)

    def _row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                      norm_weight: torch.Tensor, num_sms: int | None,
                      silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj or down_proj, the residual add and the next RMSNorm -> (new residual, normed). On one rank the add
        and norm are the GEMM's epilogue; under TP they follow the all-reduce of the ranks' partial sums, whose bias
        rank 0 alone adds, so that the sum holds it once."""
        eps = self.config.rms_norm_eps
        if self.tp.size == 1:
            return gemm(x, weight, bias, num_sms=num_sms, silu_mul=silu_mul, residual=residual,
                        norm_weight=norm_weight, eps=eps)
        out = gemm(x, weight, bias if self.tp.rank == 0 else None, num_sms=num_sms, silu_mul=silu_mul)
        normed, residual = rms_norm(all_reduce(out, self.tp), norm_weight, eps, residual=residual, num_sms=num_sms)
        return residual, normed

    def _embed(self, input_ids: torch.Tensor, num_sms: int | None) -> torch.Tensor:
        if self.tp.size == 1:
            return gather_rows(input_ids, self.embed_tokens, num_sms=num_sms)
        # Vocab-parallel lookup (as vLLM does): ids of other ranks' shards give zero rows, so the all-reduce holds each
        # token's one row exactly. An all-gather instead would need each rank to know which tokens the others looked up.
        rows = gather_rows(input_ids, self.embed_tokens, row_start=self.layout.vocab_start, num_sms=num_sms)
        return all_reduce(rows, self.tp)

    def compute_logits(self, hidden: torch.Tensor, num_sms: int | None = None) -> torch.Tensor:
        """hidden [B, H] (already final-normed by forward) -> logits [B, V] via the lm_head GEMM, the whole
        vocabulary on every rank (each computes its vocabulary shard; the shards are all-gathered)."""
        with interpreter_blas():
            return gather_vocab(gemm(hidden, self.lm_head, num_sms=num_sms), self.tp, self.config.vocab_size)

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
