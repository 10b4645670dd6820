"""Engine settings and the assembly of an engine's parts: model, tokenizer, KV-cache size, scheduler, executor, policy."""
import logging
import math
from dataclasses import dataclass

import torch

from minidu.kernels.platform import INTERPRET
from minidu.model_runner import ModelRunner
from minidu.models.config import ModelConfig
from minidu.models.loader import build_model, resolve_dtype, resolve_model
from minidu.scheduler.block_manager import BlockManager
from minidu.kernels.utils import device_num_sms
from minidu.scheduler.hardware import HardwareProfile, load_profile
from minidu.scheduler.policy import POLICIES, AggregatedPolicy, DuetPolicy, PrefillFirstPolicy, StaticPolicy
from minidu.scheduler.roofline import LatencyModel, ModelShape
from minidu.scheduler.sim_executor import SimulatedExecutor
from minidu.scheduler.scheduler import Scheduler, SchedulerConfig
from minidu.tokenizer import Tokenizer

logger = logging.getLogger("minidu")

CPU_NUM_KV_BLOCKS = 256


@dataclass(slots=True)
class EngineConfig:
    """Every setting of an engine, in one place: `minidu.Engine(model, **options)` takes these fields as keywords."""

    model: str  # checkpoint directory, GGUF file, preset name (random weights) or Hub repo id
    dtype: str | torch.dtype = "auto"  # "auto": the checkpoint's (float32 for bf16 models on the CPU)
    device: str | torch.device | None = None  # None: cuda when available, else cpu (interpreted)
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # None: what fits in gpu_memory_utilization of the device
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256  # running requests at most
    max_num_batched_tokens: int = 2048  # new tokens per step at most (decodes plus prefill chunks)
    max_model_len: int | None = None  # prompt plus output tokens at most; None: the model's, capped by the KV cache
    enable_prefix_caching: bool = True
    load_format: str = "auto"  # "dummy": random weights
    seed: int = 0  # random weights and the seeds of requests that give none
    policy: str = "aggregated"  # aggregated | prefill-first | static | duet
    tbt_slo_ms: float | None = None  # the time-between-tokens objective (duet)
    enforce_eager: bool = False  # no CUDA graphs
    backend: str = "gpu"  # gpu: run the model; sim: the latency model on a virtual clock
    hardware: str | None = None  # h100 | h200 | a100 | a profile JSON; None: the CUDA device's, H200 in simulation
    decode_sms: int | None = None  # the static policy's decode SMs; None: half
    allow_long_max_model_len: bool = False  # max_model_len above max_position_embeddings (vLLM's override)
    tensor_parallel_size: int = 1  # GPUs the model is sharded over (simulated only, so far)

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("num_kv_blocks", "max_model_len", "decode_sms"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if self.backend not in ("gpu", "sim"):
            raise ValueError(f"backend must be 'gpu' (run the model) or 'sim' (simulate it), got {self.backend!r}")
        if self.tensor_parallel_size != 1 and self.backend != "sim":
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size}: tensor parallelism runs only in the "
                             f"simulator (backend='sim') so far; the {self.backend!r} backend runs on one GPU")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        for name in ("enable_prefix_caching", "enforce_eager", "allow_long_max_model_len"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.hardware is not None and not isinstance(self.hardware, str):
            raise ValueError(f"hardware must be None or a str, got {self.hardware!r}")
        if self.tbt_slo_ms is not None and not (_is_number(self.tbt_slo_ms) and 0 < self.tbt_slo_ms < math.inf):
            raise ValueError(f"tbt_slo_ms must be a finite number > 0, got {self.tbt_slo_ms!r}")
        if not _is_number(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_max_model_len(cfg: EngineConfig, model_config: ModelConfig) -> None:
    """max_model_len past the model's max_position_embeddings needs allow_long_max_model_len, and is refused for
    dynamic rope, whose frequencies transformers changes past that length."""
    limit = model_config.max_position_embeddings
    if cfg.max_model_len is None or cfg.max_model_len <= limit:
        return
    rope_type = (model_config.rope_scaling or {}).get("rope_type", "default")
    if rope_type == "dynamic":
        raise ValueError(f"max_model_len={cfg.max_model_len} exceeds max_position_embeddings={limit}, past which "
                         f"dynamic rope changes its frequencies; that is not supported")
    if not cfg.allow_long_max_model_len:
        raise ValueError(f"max_model_len={cfg.max_model_len} exceeds the model's max_position_embeddings={limit}; "
                         f"pass allow_long_max_model_len=True to run past it anyway")
    logger.warning("max_model_len=%d exceeds max_position_embeddings=%d (allow_long_max_model_len)",
                   cfg.max_model_len, limit)


@dataclass(slots=True)
class EngineParts:
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    scheduler: Scheduler
    executor: ModelRunner | SimulatedExecutor
    policy: object
    max_model_len: int
    latency_model: LatencyModel | None
    num_sms: int  # every SM the engine's steps may use


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and INTERPRET:
        raise ValueError("device cuda was asked for, but Triton runs interpreted here (no CUDA or TRITON_INTERPRET=1)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device}")
    if device.type == "cpu" and not INTERPRET:
        raise ValueError("device cpu needs Triton's interpreter: set TRITON_INTERPRET=1 before importing minidu")
    return device


def engine_dtype(dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """The config's dtype, except that interpreted runs use float32 for bf16 models (the interpreter's bf16 dot is wrong)."""
    resolved = resolve_dtype(dtype, config)
    if device.type == "cpu" and resolved == torch.bfloat16:
        if dtype != "auto":
            raise ValueError("dtype bfloat16 cannot run on the CPU: Triton's interpreter computes bf16 matmuls wrongly; "
                             "use float32 or float16")
        logger.info("model dtype is bfloat16; running in float32 on the CPU")
        return torch.float32
    return resolved


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1) -> int:
    """One rank's bytes for a block: its share of the kv heads (one replicated head when fewer heads than ranks)."""
    kv_heads = max(1, config.num_key_value_heads // tensor_parallel_size)
    per_token = 2 * config.num_hidden_layers * kv_heads * config.head_dim
    return per_token * block_size * dtype.itemsize


def _activation_bytes(cfg: EngineConfig, c: ModelConfig, dtype: torch.dtype) -> int:
    """A generous bound on one step's (one rank's) live activations: a few token-wide buffers plus fp32 logits
    (gathered whole for sampling)."""
    n = cfg.tensor_parallel_size
    width = ((c.num_attention_heads // n + 2 * max(1, c.num_key_value_heads // n)) * c.head_dim
             + 2 * c.intermediate_size // n + 2 * c.hidden_size)
    return 3 * cfg.max_num_batched_tokens * width * dtype.itemsize + cfg.max_num_seqs * c.vocab_size * 4


def _blocks_in(available: float, cfg: EngineConfig, model_config: ModelConfig, dtype: torch.dtype) -> int:
    blocks = int(available // kv_bytes_per_block(model_config, cfg.block_size, dtype, cfg.tensor_parallel_size))
    if blocks < 1:
        raise ValueError(f"no memory left for the KV cache ({available / 2**30:.1f} GiB after weights and "
                         f"activations); raise gpu_memory_utilization or lower max_num_batched_tokens")
    return blocks


def num_kv_blocks_for(cfg: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> int:
    """`num_kv_blocks`, or what fits in gpu_memory_utilization of the device after weights and activations."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    if device.type != "cuda":
        return CPU_NUM_KV_BLOCKS
    free, total = torch.cuda.mem_get_info(device)
    available = free - total * (1 - cfg.gpu_memory_utilization) - _activation_bytes(cfg, model_config, dtype)
    return _blocks_in(available, cfg, model_config, dtype)


def sim_num_kv_blocks(cfg: EngineConfig, model_config: ModelConfig, hw: HardwareProfile, dtype: torch.dtype) -> int:
    """The KV blocks each simulated GPU would hold: its memory times gpu_memory_utilization, less one rank's weights
    (its shard of every sharded matrix) and activations."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    memory = hw.memory_bytes
    if not memory:
        raise ValueError(f"the memory of hardware {hw.name!r} is unknown: pass num_kv_blocks")
    c, s = model_config, model_shape(model_config, dtype, cfg.tensor_parallel_size)
    weights = (s.rank_vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * (
        c.hidden_size * (s.rank_heads + 2 * s.rank_kv_heads) * c.head_dim
        + s.rank_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * s.rank_intermediate_size))
    available = memory * cfg.gpu_memory_utilization - weights * dtype.itemsize - _activation_bytes(cfg, c, dtype)
    return _blocks_in(available, cfg, c, dtype)


def model_shape(c: ModelConfig, dtype: torch.dtype, tensor_parallel_size: int = 1) -> ModelShape:
    return ModelShape(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                      c.intermediate_size, c.vocab_size, dtype.itemsize, c.qk_norm, c.attention_bias,
                      tensor_parallel_size=tensor_parallel_size)


def hardware_profile(cfg: EngineConfig, device: torch.device) -> HardwareProfile | None:
    """The profile the latency model uses: `hardware`, else the CUDA device's by name, else H200 in simulation."""
    if cfg.hardware is not None:
        return load_profile(cfg.hardware)
    if cfg.backend == "sim":
        return load_profile("h200")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for preset in ("h200", "h100", "a100"):
            if preset in name:
                return load_profile(preset)
    return None


def build_parts(cfg: EngineConfig) -> EngineParts:
    sim = cfg.backend == "sim"
    device = torch.device("cpu") if sim else resolve_device(cfg.device)
    path, model_config = resolve_model(cfg.model, "dummy" if sim else cfg.load_format)
    check_max_model_len(cfg, model_config)
    dtype = resolve_dtype(cfg.dtype, model_config) if sim else engine_dtype(cfg.dtype, model_config, device)
    hw = hardware_profile(cfg, device)
    if sim:
        num_blocks = sim_num_kv_blocks(cfg, model_config, hw, dtype)
    else:
        num_blocks = num_kv_blocks_for(cfg, model_config, device, dtype)
    capacity = num_blocks * cfg.block_size
    max_model_len = cfg.max_model_len or min(model_config.max_position_embeddings, capacity)
    if max_model_len > capacity:
        raise ValueError(f"max_model_len={max_model_len} does not fit in the KV cache ({num_blocks} blocks of "
                         f"{cfg.block_size} tokens = {capacity}); lower it or give more KV blocks")
    scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, max_model_len),
                          BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching))
    shape = model_shape(model_config, dtype, cfg.tensor_parallel_size)
    latency = LatencyModel(shape, hw) if hw is not None else None
    num_sms = hw.num_sms if hw is not None else device_num_sms()
    policy = make_policy(cfg, latency, num_sms)
    if sim:
        executor = SimulatedExecutor(latency, hw.num_sms, model_config.vocab_size)
        tokenizer = None
    else:
        model = build_model(path, model_config, dtype=dtype, device=device, load_format=cfg.load_format,
                            seed=cfg.seed)
        executor = ModelRunner(model, model_config, num_kv_blocks=num_blocks, block_size=cfg.block_size,
                               max_num_seqs=cfg.max_num_seqs, max_model_len=max_model_len, device=device, dtype=dtype,
                               use_cuda_graph=not cfg.enforce_eager)
        tokenizer = Tokenizer.from_path(str(path)) if path else None
    logger.info("%s (%s backend) on %s, %s: %d KV blocks of %d tokens, max_model_len %d, policy %s", cfg.model,
                cfg.backend, hw.name if sim else f"{device}{' (Triton interpreter)' if INTERPRET else ''}", dtype, num_blocks, cfg.block_size, max_model_len, cfg.policy)
    return EngineParts(model_config, tokenizer, scheduler, executor, policy, max_model_len, latency, num_sms)


def make_policy(cfg: EngineConfig, latency: LatencyModel | None, num_sms: int):
    if cfg.policy == "aggregated":
        return AggregatedPolicy()
    if cfg.policy == "prefill-first":
        return PrefillFirstPolicy()
    if latency is None:
        raise ValueError(f"policy {cfg.policy!r} needs a latency model: pass hardware= (h100, h200, a100 or a "
                         f"profile JSON) on this device")
    if cfg.policy == "static":
        return StaticPolicy(latency, num_sms, cfg.decode_sms or num_sms // 2)
    if cfg.tbt_slo_ms is None:
        raise ValueError("policy 'duet' needs tbt_slo_ms, the time-between-tokens objective")
    return DuetPolicy(latency, num_sms, cfg.tbt_slo_ms / 1e3)
