"""Reads llama.cpp GGUF checkpoints: a Hugging Face style config dict from the metadata and HF-named tensors
dequantized by gguf's own reference code, with llama.cpp's q/k row permutation undone for llama-arch files."""
import functools
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from minidu.models.parallel import CheckpointTensor, Shard

try:
    import gguf
except ImportError:  # optional extra: pip install 'minidu[gguf]'
    gguf = None

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Per-layer llama.cpp tensor names (blk.N.<key>.weight|bias) -> HF module names under model.layers.N.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp stores Llama-3 rope scaling as per-frequency divisors instead of metadata keys.
_ROPE_FREQS = "rope_freqs.weight"


def _require_gguf() -> None:
    if gguf is None:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'minidu[gguf]'")


@functools.cache  # one class (gguf is an optional import, so it cannot be defined at module level)
def _plain_array_reader() -> type:
    """gguf.GGUFReader over a plain ndarray view of its memory map. The reader slices its `data` once per metadata
    value (about 250,000 slices for a 49k-token vocabulary), and np.memmap runs Python hooks on every slice: on a plain
    view of the same mapping the parse takes a quarter of the time (3.0 s -> 0.8 s for SmolLM2) and reads the same
    bytes."""

    class PlainArrayReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)  # the view keeps the memmap (and the mapping) alive

    return PlainArrayReader


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    try:
        return _plain_array_reader()(path)
    except ValueError as e:  # bad magic, unsupported version, truncated header
        raise ValueError(f"path {path!r} is not a readable GGUF file: {e}") from e


def _open_reader(path: str | os.PathLike):
    """Parses `path` once per (file, mtime, size): metadata and tensor reads share one memory-mapped reader."""
    _require_gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path {path!r} is not a GGUF file")
    stat = os.stat(path)
    return _cached_reader(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


def _field_value(field) -> Any:
    value = field.contents()
    if isinstance(value, list):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value.item() if isinstance(value, np.generic) else value


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of a GGUF file (general.*, <arch>.*, tokenizer.*) as plain Python values."""
    reader = _open_reader(path)
    return {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def hf_tensor_name(name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name; ValueError naming it when it has no HF counterpart."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart in the supported architectures")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's LlamaModel.permute for one q/k weight [rows, in] or bias [rows].

    The converter views each head's rows as (2, head_dim/2) (HF rotate-half halves) and transposes them to
    (head_dim/2, 2) so rotation pairs sit next to each other; reading the rows back as (head_dim/2, 2) and
    transposing restores HF's layout.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"q/k tensor with {rows} rows cannot be split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_dequantizable(name: str, qtype) -> None:
    """Dequantizes one zero block, so the check follows whatever the installed gguf.quants supports."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        raise ValueError(f"GGUF tensor {name!r} has quantization type {qtype.name}, "
                         "which gguf.quants cannot dequantize") from None


# Elements per dequantization call. gguf.quants.dequantize works 16 rows a call, and on rows as short as SmolLM2's
# (576) its numpy calls' overhead costs more than their arithmetic (about 11 ns an element for Q4_1); chunks of 65536
# elements run the same per-block arithmetic, so the same floats, twice as fast, with temporaries that stay in cache.
_DEQUANT_CHUNK_ELEMS = 2 ** 16


def _dequantize_data(data: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.dequantize(data, qtype), through its quantization class's own dequantize_rows in big chunks."""
    quant = getattr(gguf.quants, qtype.name, None)
    if quant is None or not hasattr(quant, "dequantize_rows") or data.dtype != np.uint8:
        return gguf.quants.dequantize(data, qtype)
    quant.init_grid()  # the lookup tables of the IQ types, as gguf.quants.dequantize prepares them
    rows = data.reshape(-1, data.shape[-1])
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_elems = rows.shape[1] // type_size * block_size
    step = max(1, _DEQUANT_CHUNK_ELEMS // max(row_elems, 1))
    out = np.empty((rows.shape[0], row_elems), dtype=np.float32)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = quant.dequantize_rows(rows[start:start + step])
    return out.reshape(*data.shape[:-1], row_elems)


def _dequantize(tensor) -> np.ndarray:
    """float32 array in numpy (= HF) axis order: GGUF lists dims fastest-first (ne0 = row length)."""
    data = _dequantize_data(tensor.data, tensor.tensor_type)
    data = data.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))
    return data if data.flags.writeable else data.copy()


def _f32_literal(value: float) -> float:
    """Shortest decimal that round-trips a float32 metadata value (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _llama3_freq_factors(head_dim: int, rope_theta: float, scaling: dict) -> np.ndarray:
    """HF/llama.cpp Llama-3 rope divisors per frequency (float64), used to recognise rope_freqs tensors."""
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old, low, high, factor = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                              scaling["high_freq_factor"], scaling["factor"])
    smooth = (old / wavelen - low) / (high - low)
    factors = 1.0 / ((1.0 - smooth) / factor + smooth)
    factors = np.where(wavelen < old / high, 1.0, factors)
    return np.where(wavelen > old / low, factor, factors)


def _llama3_scaling_from_freqs(freqs: np.ndarray, head_dim: int, rope_theta: float) -> dict | None:
    """Recovers HF's llama3 rope_scaling dict from llama.cpp's rope_freqs divisors.

    The divisors depend on (original context, low, high) only through their ratios, so low_freq_factor is
    fixed to 1 and the other two are solved from the smoothly interpolated frequencies, then verified.
    """
    freqs = freqs.astype(np.float64)
    factor = float(freqs.max())
    if factor == 1.0:
        return None
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (1.0 / freqs - 1.0 / factor) / (1.0 - 1.0 / factor)
    medium = (smooth > 1e-6) & (smooth < 1 - 1e-6)
    if medium.sum() < 2:
        raise ValueError(f"{_ROPE_FREQS} has fewer than two interpolated frequencies; "
                         "cannot recover the llama3 rope_scaling parameters")
    # smooth = (old * inv_freq / (2 pi) - 1) / (high - 1): linear in the unknowns (old, high - 1).
    lhs = np.stack([inv_freq[medium] / (2 * math.pi), -smooth[medium]], axis=1)
    (old, high_minus_one), *_ = np.linalg.lstsq(lhs, np.ones(int(medium.sum())), rcond=None)
    scaling = {"rope_type": "llama3", "factor": _f32_literal(factor), "low_freq_factor": 1.0,
               "high_freq_factor": round(float(high_minus_one) + 1.0, 4),
               "original_max_position_embeddings": int(round(float(old)))}
    if not np.allclose(_llama3_freq_factors(head_dim, rope_theta, scaling), freqs, rtol=1e-4, atol=0):
        raise ValueError(f"{_ROPE_FREQS} does not follow the llama3 rope scaling formula")
    return scaling


def _rope_scaling(meta: dict, arch: str, rope_freqs: np.ndarray | None, head_dim: int,
                  rope_theta: float) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if meta.get(f"{arch}.attention.sliding_window"):
        raise ValueError(f"GGUF metadata {arch}.attention.sliding_window="
                         f"{meta[f'{arch}.attention.sliding_window']} is not supported (full attention only)")
    if kind is None and f"{arch}.rope.scale_linear" in meta:  # pre-2024 files
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": _f32_literal(factor)}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta[f"{arch}.rope.scaling.original_context_length"])
        return scaling
    if rope_freqs is not None:
        return _llama3_scaling_from_freqs(rope_freqs, head_dim, rope_theta)
    return None


def _single_value(meta: dict, key: str, default=None) -> int:
    """A per-model count that llama.cpp may also store per layer (an array); only uniform arrays are supported."""
    value = meta.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF metadata {key!r} varies per layer ({value}); not supported")
        value = value[0]
    return int(value)


def _torch_dtype_name(tensors) -> str:
    types = {t.tensor_type for t in tensors if len(t.shape) == 2}
    if gguf.GGMLQuantizationType.BF16 in types:
        return "bfloat16"
    if types <= {gguf.GGMLQuantizationType.F32}:
        return "float32"
    return "float16"


# The `{arch}.*` metadata keys this loader reads (or checks and refuses); any other key of the architecture may change
# the arithmetic (logit scales, soft-capping, experts, attention scales ...), so a file carrying one is refused.
KNOWN_ARCH_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window", "rope.dimension_count", "rope.freq_base",
    "rope.scale_linear", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
}


def check_arch_keys(meta: dict, arch: str) -> None:
    """Refuses, by name and value, metadata of the architecture that minidu does not implement."""
    unknown = {k: meta[k] for k in meta if k.startswith(f"{arch}.") and k[len(arch) + 1:] not in KNOWN_ARCH_KEYS}
    if unknown:
        raise ValueError(f"GGUF metadata {unknown} is not supported (it may change the model's arithmetic)")
    value_length = meta.get(f"{arch}.attention.value_length")
    key_length = meta.get(f"{arch}.attention.key_length")
    if value_length is not None and value_length != key_length:
        raise ValueError(f"GGUF metadata {arch}.attention.value_length={value_length} differs from key_length="
                         f"{key_length}: attention with different key and value sizes is not supported")


def gguf_hf_config(meta: dict, tensors, rope_freqs: np.ndarray | None = None) -> dict:
    """The Hugging Face config.json equivalent of a GGUF file's metadata and tensor list."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})")
    check_arch_keys(meta, arch)
    names = {t.name: t for t in tensors}
    if "token_embd.weight" not in names:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    hidden = _single_value(meta, f"{arch}.embedding_length")
    heads = _single_value(meta, f"{arch}.attention.head_count")
    head_dim = _single_value(meta, f"{arch}.attention.key_length", hidden // heads)
    rope_dim = _single_value(meta, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{arch}.rope.dimension_count={rope_dim} != head_dim={head_dim}: partial rotary "
                         "embeddings are not supported")
    rope_theta = _f32_literal(meta.get(f"{arch}.rope.freq_base", 10000.0))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(names["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": _single_value(meta, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _single_value(meta, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _single_value(meta, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32_literal(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(meta, arch, rope_freqs, head_dim, rope_theta),
        "max_position_embeddings": _single_value(meta, f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": _torch_dtype_name(tensors),
    }
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    # End-of-turn ids stop generation as well (HF keeps them in a list-valued eos_token_id).
    eos = [int(meta[f"tokenizer.ggml.{key}_token_id"]) for key in ("eos", "eot", "eom")
           if f"tokenizer.ggml.{key}_token_id" in meta]
    eos = list(dict.fromkeys(eos))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _hf_tensors(reader, arch: str, config: dict, dtype: torch.dtype) -> Iterator[tuple[str, CheckpointTensor]]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue
        name = hf_tensor_name(tensor.name)
        # Only the llama converter permutes q/k (weights and biases); Qwen2/Qwen3 keep HF's layout.
        permuted_heads = None
        if arch == "llama" and ".self_attn.q_proj." in name:
            permuted_heads = heads
        elif arch == "llama" and ".self_attn.k_proj." in name:
            permuted_heads = kv_heads
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        yield name, CheckpointTensor(shape, functools.partial(_read_shard, tensor, permuted_heads, dtype))


def _read_shard(tensor, permuted_heads: int | None, dtype: torch.dtype, shard: Shard) -> torch.Tensor:
    """One shard of a GGUF tensor in HF layout, dequantizing no more than the quant blocks it needs."""
    data = _dequantize(tensor) if shard.dim is None else _dequantize_shard(tensor, shard)
    if permuted_heads is not None:
        # q/k shards are whole heads (rows), and the converter's permutation keeps each head's rows within the head,
        # so unpermuting the shard's own heads gives the shard of the unpermuted tensor.
        data = unpermute_qk(data, permuted_heads * shard.shape[0] // shard.full_shape[0])
    return torch.from_numpy(data).to(dtype)


def _dequantize_shard(tensor, shard: Shard) -> np.ndarray:
    """float32 [shard.shape] of a GGUF tensor: a slice of rows reads only those rows' quant blocks. A slice along a
    row (the columns of a row-parallel weight) reads only its blocks when both ends fall on quant block boundaries
    (always for float types; Q8_0 and Q4_x blocks are 32 wide, K-quants 256); otherwise the rows are dequantized whole
    and sliced."""
    data = tensor.data  # numpy axis order; quantized types as uint8 [..., bytes per row]
    if shard.dim == len(shard.full_shape) - 1:
        block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        if shard.start % block or shard.stop % block:
            return np.ascontiguousarray(_dequantize(tensor)[shard.index()])
        if data.dtype == np.uint8:
            part = data[..., shard.start // block * block_bytes:shard.stop // block * block_bytes]
        else:
            part = data[..., shard.start:shard.stop]
    else:
        part = data[shard.index()]
    out = _dequantize_data(np.ascontiguousarray(part), tensor.tensor_type).reshape(shard.shape)
    return out if out.flags.writeable else out.copy()


def read_gguf_shards(path: str | os.PathLike, dtype: torch.dtype = torch.float32
                     ) -> tuple[dict, Iterator[tuple[str, CheckpointTensor]]]:
    """(HF config dict, lazy iterator of (HF name, tensor not read yet)) for a llama / qwen2 / qwen3 GGUF file; reading
    a shard of an item dequantizes only what that shard needs, in `dtype`.

    The architecture, tensor names and quantization types are all validated before the iterator is returned,
    so unsupported files fail here rather than halfway through loading. Tokenizer metadata: read_gguf_metadata.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    reader = _open_reader(path)
    meta = read_gguf_metadata(path)
    rope_freqs = next((_dequantize(t) for t in reader.tensors if t.name == _ROPE_FREQS), None)
    config = gguf_hf_config(meta, reader.tensors, rope_freqs)
    for tensor in reader.tensors:
        if tensor.name != _ROPE_FREQS:
            hf_tensor_name(tensor.name)
        _check_dequantizable(tensor.name, tensor.tensor_type)
    return config, _hf_tensors(reader, meta["general.architecture"], config, dtype)


def read_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32
              ) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(HF config dict, lazy iterator of (HF name, whole tensor in `dtype`)): read_gguf_shards, every tensor read whole."""
    config, tensors = read_gguf_shards(path, dtype)
    return config, ((name, tensor.read(Shard(tensor.shape))) for name, tensor in tensors)
