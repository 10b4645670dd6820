"""ModelConfig: the subset of a Hugging Face config.json (plus generation_config.json's eos ids) that the decoder
needs, read as transformers reads it; every key that changes the arithmetic is implemented or refused by name."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# "dynamic" equals "default" for positions below max_position_embeddings, the limit the engine enforces for it.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# The keys transformers reads for each rope type (besides rope_type/type, rope_theta and partial_rotary_factor).
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
}
# Defaults of the transformers 5 config classes for keys a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "Qwen2ForCausalLM": 32768, "Qwen3ForCausalLM": 32768}
# Qwen3Config's head_dim defaults to 128, not to hidden_size / num_attention_heads as Llama's and Qwen2's do.
_DEFAULT_HEAD_DIM = {"Qwen3ForCausalLM": 128}
# Which architectures' config classes define the bias switches (the others never read them: Qwen2 always has q/k/v
# biases and no others, Qwen3 has no MLP biases).
_HAS_ATTENTION_BIAS_KEY = ("LlamaForCausalLM", "Qwen3ForCausalLM")
_HAS_MLP_BIAS_KEY = ("LlamaForCausalLM",)
_HAS_SLIDING_WINDOW = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # rope_parameters less rope_theta, with "rope_type"; None for default rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections have biases
    qk_norm: bool
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    o_proj_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        """Builds the config from a config.json dict; errors name `source` and the offending key."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        reader = _Reader(d, source)
        architecture = _architecture(d, source)
        _refuse_unsupported(reader)
        hidden_size = reader.positive_int("hidden_size")
        num_heads = reader.positive_int("num_attention_heads")
        num_kv_heads = reader.positive_int("num_key_value_heads", num_heads)
        num_layers = reader.positive_int("num_hidden_layers")
        if num_heads % num_kv_heads:
            raise ValueError(f"{source}: num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        head_dim = _head_dim(reader, architecture, hidden_size, num_heads)
        if architecture in _HAS_SLIDING_WINDOW:
            _refuse_sliding_window(reader, num_layers)
        max_positions = reader.positive_int("max_position_embeddings", _DEFAULT_MAX_POSITIONS[architecture])
        rope_theta, rope_scaling = _rope(d, source, max_positions)
        attention_bias = architecture in _HAS_ATTENTION_BIAS_KEY and reader.boolean("attention_bias", False)
        return cls(
            architecture=architecture,
            vocab_size=reader.positive_int("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=reader.positive_int("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=reader.positive_float("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=reader.boolean("tie_word_embeddings", False),
            attention_bias=attention_bias or architecture == "Qwen2ForCausalLM",
            qk_norm=architecture == "Qwen3ForCausalLM",
            torch_dtype=reader.string("torch_dtype", d.get("dtype") or "float32"),
            bos_token_id=reader.token_ids("bos_token_id", single=True),
            eos_token_ids=reader.token_ids("eos_token_id"),
            o_proj_bias=attention_bias,
            mlp_bias=architecture in _HAS_MLP_BIAS_KEY and reader.boolean("mlp_bias", False),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Reads `path`/config.json; eos (and bos) ids in generation_config.json, when present, take precedence."""
        path = Path(path)
        config = cls.from_hf_dict(_read_json(path / "config.json"), str(path / "config.json"))
        generation_path = path / "generation_config.json"
        if generation_path.is_file():
            generation = _read_json(generation_path)
            if not isinstance(generation, dict):
                raise ValueError(f"{generation_path}: expected a JSON object, got {type(generation).__name__}")
            reader = _Reader(generation, str(generation_path))
            config.eos_token_ids = reader.token_ids("eos_token_id") or config.eos_token_ids
            bos = reader.token_ids("bos_token_id", single=True)
            config.bos_token_id = config.bos_token_id if bos is None else bos
        return config


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _architecture(d: dict, source: str) -> str:
    architectures = d.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise ValueError(f"{source}: 'architectures' must be a non-empty list, got {architectures!r}")
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise ValueError(f"{source}: architectures {architectures} are not supported; "
                     f"supported: {list(SUPPORTED_ARCHITECTURES)}")


def _refuse_unsupported(reader: "_Reader") -> None:
    d, source = reader.d, reader.source
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    if d.get("quantization_config") is not None:
        method = d["quantization_config"].get("quant_method") if isinstance(d["quantization_config"], dict) else None
        raise ValueError(f"{source}: quantization_config (quant_method {method!r}) is not supported: minidu runs "
                         f"unquantized float weights only")


def _head_dim(reader: "_Reader", architecture: str, hidden_size: int, num_heads: int) -> int:
    source = reader.source
    default = _DEFAULT_HEAD_DIM.get(architecture)
    if default is None and reader.d.get("head_dim") is None:
        if hidden_size % num_heads:
            raise ValueError(f"{source}: head_dim is missing and hidden_size ({hidden_size}) is not a multiple of "
                             f"num_attention_heads ({num_heads})")
        default = hidden_size // num_heads
    head_dim = reader.positive_int("head_dim", default)
    if head_dim % 2:
        raise ValueError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")
    return head_dim


def _refuse_sliding_window(reader: "_Reader", num_layers: int) -> None:
    """Qwen2/Qwen3 attend through a sliding window on the layers layer_types marks (by default, with
    use_sliding_window, the layers from max_window_layers on); minidu has full attention only."""
    d, source = reader.d, reader.source
    use_sliding = reader.boolean("use_sliding_window", False)
    layer_types = d.get("layer_types")
    if layer_types is None:
        first_sliding = reader.non_negative_int("max_window_layers", 28)
        if use_sliding and d.get("sliding_window") is not None and first_sliding < num_layers:
            raise ValueError(f"{source}: use_sliding_window true with sliding_window {d['sliding_window']!r} from "
                             f"layer max_window_layers={first_sliding} on is not supported (full attention only)")
        return
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ValueError(f"{source}: 'layer_types' must be a list of {num_layers} layer types, got {layer_types!r}")
    other = sorted({t for t in layer_types if t != "full_attention"}, key=str)
    if other:
        raise ValueError(f"{source}: layer_types {other} are not supported (only 'full_attention')")


def _rope(d: dict, source: str, max_positions: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) merged from rope_parameters (transformers 5) or rope_scaling plus the top-level
    rope_theta / partial_rotary_factor (4.x), with the same precedence and defaults as transformers."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    if not isinstance(params, dict):
        raise ValueError(f"{source}: '{key}' must be an object or null, got {params!r}")
    params = dict(params)
    if d.get("rope_theta") is not None:
        params.setdefault("rope_theta", d["rope_theta"])
    if d.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    rope_type = params.pop("rope_type", params.get("type", "default"))
    params.pop("type", None)
    reader = _Reader(params, f"{source}: {key}")
    theta = reader.positive_float("rope_theta", 10000.0)
    params.pop("rope_theta", None)
    if reader.positive_float("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor {params['partial_rotary_factor']!r} is not supported: "
                         f"transformers' {list(SUPPORTED_ARCHITECTURES)} rotate the whole head")
    params.pop("partial_rotary_factor", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: '{key}' has unsupported rope_type {rope_type!r}; "
                         f"supported: {list(SUPPORTED_ROPE_TYPES)}")
    unknown = sorted(set(params) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ValueError(f"{source}: '{key}' keys {unknown} are not supported with rope_type {rope_type!r}")
    if rope_type in ("llama3", "yarn"):
        # A top-level original_max_position_embeddings (as Phi-3 writes) takes precedence, as in transformers.
        original = d.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
        params["original_max_position_embeddings"] = original if original is not None else max_positions
        reader.positive_int("original_max_position_embeddings")
    if rope_type == "default":
        return theta, None
    reader.positive_float("factor", None)
    for name in ("low_freq_factor", "high_freq_factor") if rope_type == "llama3" else ():
        reader.positive_float(name, None)
    for name in ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        _optional_number(reader, name)
    if rope_type == "yarn":
        reader.boolean("truncate", True)
    return theta, {"rope_type": rope_type, **params}


def _optional_number(reader: "_Reader", key: str) -> None:
    value = reader.d.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        raise reader._error(key, "a finite number or null")


class _Reader:
    """Typed access to config keys, with errors that name the file and the key."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def _error(self, key: str, expected: str) -> ValueError:
        return ValueError(f"{self.source}: '{key}' must be {expected}, got {self.d.get(key)!r}")

    def _get(self, key: str, default):
        value = self.d.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"{self.source}: required key '{key}' is missing")
            return default
        return value

    def positive_int(self, key: str, default: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self._error(key, "a positive integer")
        return value

    def positive_float(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise self._error(key, "a positive number")
        return float(value)

    def non_negative_int(self, key: str, default: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._error(key, "a non-negative integer")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.d.get(key, default)
        if not isinstance(value, bool):
            raise self._error(key, "true or false")
        return value

    def string(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._error(key, "a string")
        return value

    def require_false(self, key: str) -> None:
        if self.boolean(key, False):
            raise ValueError(f"{self.source}: '{key}': true is not supported")

    def token_ids(self, key: str, single: bool = False):
        """An id (single=True: int | None) or ids (list[int], possibly empty) from an int, a list of ints or null."""
        value = self.d.get(key)
        ids = [] if value is None else [value] if single or not isinstance(value, list) else value
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids) or (single and len(ids) > 1):
            raise self._error(key, "a non-negative integer" + ("" if single else " or a list of them"))
        if single:
            return ids[0] if ids else None
        return list(ids)
