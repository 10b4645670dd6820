"""ModelConfig: the subset of a Hugging Face config.json (plus generation_config.json's eos ids) that the decoder
needs, validated with errors that name the file and the key."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Defaults of the transformers config classes for keys a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "Qwen2ForCausalLM": 32768, "Qwen3ForCausalLM": 32768}


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
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: list[int]

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        """Builds the config from a config.json dict; errors name `source` and the offending key."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        reader = _Reader(d, source)
        architecture = _architecture(d, source)
        hidden_size = reader.positive_int("hidden_size")
        num_heads = reader.positive_int("num_attention_heads")
        num_kv_heads = reader.positive_int("num_key_value_heads", num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{source}: num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        if d.get("head_dim") is None and hidden_size % num_heads:
            raise ValueError(f"{source}: head_dim is missing and hidden_size ({hidden_size}) is not a multiple of "
                             f"num_attention_heads ({num_heads})")
        head_dim = reader.positive_int("head_dim", hidden_size // num_heads)
        if head_dim % 2:
            raise ValueError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")
        reader.require_false("mlp_bias")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if architecture == "Qwen2ForCausalLM":
            attention_bias = True  # Qwen2 always has q/k/v biases; its config has no key for them.
        else:
            reader.require_false("attention_bias")
            attention_bias = False
        return cls(
            architecture=architecture,
            vocab_size=reader.positive_int("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=reader.positive_int("intermediate_size"),
            num_hidden_layers=reader.positive_int("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=reader.positive_float("rms_norm_eps", 1e-6),
            rope_theta=reader.positive_float("rope_theta", 10000.0),
            rope_scaling=_rope_scaling(d.get("rope_scaling"), source),
            max_position_embeddings=reader.positive_int("max_position_embeddings",
                                                        _DEFAULT_MAX_POSITIONS[architecture]),
            tie_word_embeddings=reader.boolean("tie_word_embeddings", False),
            attention_bias=attention_bias,
            qk_norm=architecture == "Qwen3ForCausalLM",
            torch_dtype=reader.string("torch_dtype", d.get("dtype") or "float32"),
            bos_token_id=reader.token_ids("bos_token_id", single=True),
            eos_token_ids=reader.token_ids("eos_token_id"),
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


def _rope_scaling(value, source: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{source}: 'rope_scaling' must be an object or null, got {value!r}")
    # Older configs name the kind "type"; newer ones "rope_type".
    rope_type = value.get("rope_type", value.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: 'rope_scaling' has unsupported rope_type {rope_type!r}; "
                         f"supported: {list(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return None
    return {**value, "rope_type": rope_type}


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
