"""Engine settings and the assembly of an engine's parts: model, tokenizer, KV-cache size, scheduler, executor, policy."""
import logging
import math
from dataclasses import dataclass

import torch

from minidu.kernels.kv_cache import allocate_kv_cache
from minidu.kernels.platform import INTERPRET
from minidu.kernels.sampling import sample
from minidu.model_runner import ModelRunner
from minidu.models.attention import AttentionMetadata
from minidu.models.config import ModelConfig
from minidu.models.loader import build_model, resolve_dtype, resolve_model
from minidu.models.parallel import TensorParallel
from minidu.scheduler.block_manager import BlockManager
from minidu.kernels.utils import device_num_sms
from minidu.scheduler.hardware import HardwareProfile, load_profile
from minidu.scheduler.partition import default_decode_sms_choices
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
    decode_sms: int | None = None  # the static policy's decode SMs; None: the decode_sms_choices entry nearest half
    # The SM budgets decode may run on when prefill and decode are split: with a splitting policy (static, duet) or when
    # given, CUDA graphs are captured for exactly these (and the whole GPU) at start-up, and no other decode budget
    # runs. None: scheduler.partition.default_decode_sms_choices (16, 32, ..., 112 on 132 SMs).
    decode_sms_choices: tuple[int, ...] | None = None
    allow_long_max_model_len: bool = False  # max_model_len above max_position_embeddings (vLLM's override)
    tensor_parallel_size: int = 1  # GPUs (on the CPU: processes) the model is sharded over, one process each
    # How long a collective between tensor-parallel ranks may wait before it raises (start-up included: rank 0's
    # rendezvous with the others); a rank that dies is noticed sooner, by its process ending.
    distributed_timeout_s: float = 600.0

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("num_kv_blocks", "max_model_len", "decode_sms"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if self.decode_sms_choices is not None:
            choices = self.decode_sms_choices
            if (not isinstance(choices, (tuple, list)) or not choices
                    or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in choices)):
                raise ValueError(f"decode_sms_choices must be None or a non-empty sequence of ints >= 1, got {choices!r}")
            self.decode_sms_choices = tuple(sorted(set(choices)))
        if self.backend not in ("gpu", "sim"):
            raise ValueError(f"backend must be 'gpu' (run the model) or 'sim' (simulate it), got {self.backend!r}")
        if not _is_number(self.distributed_timeout_s) or not 0 < self.distributed_timeout_s < math.inf:
            raise ValueError(f"distributed_timeout_s must be a number of seconds > 0, got {self.distributed_timeout_s!r}")
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
    executor: ModelRunner | SimulatedExecutor  # or, past one rank, a tp_executor.TensorParallelExecutor
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
    s = model_shape(c, dtype, cfg.tensor_parallel_size)
    width = (s.rank_heads + 2 * s.rank_kv_heads) * c.head_dim + 2 * s.rank_intermediate_size + 2 * c.hidden_size
    return 3 * cfg.max_num_batched_tokens * width * dtype.itemsize + cfg.max_num_seqs * c.vocab_size * 4


def _blocks_in(available: float, cfg: EngineConfig, model_config: ModelConfig, dtype: torch.dtype) -> int:
    blocks = int(available // kv_bytes_per_block(model_config, cfg.block_size, dtype, cfg.tensor_parallel_size))
    if blocks < 1:
        raise ValueError(f"no memory left for the KV cache ({available / 2**30:.1f} GiB after weights and "
                         f"activations); raise gpu_memory_utilization or lower max_num_batched_tokens")
    return blocks


@dataclass(frozen=True, slots=True)
class MemorySplit:
    """How a device's memory is shared out (bytes): `total * gpu_memory_utilization` is the engine's, of which `used`
    is taken after loading (weights, plus whatever else the process or others hold), `peak_activation` is the peak of
    a forward pass at max_num_batched_tokens, and the rest goes to the KV cache."""

    total: int
    utilization: float
    used: int
    peak_activation: int

    @property
    def kv_cache(self) -> int:
        return int(self.total * self.utilization) - self.used - self.peak_activation

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"{self.total / gib:.1f} GiB x {self.utilization} = {self.total * self.utilization / gib:.1f} GiB: "
                f"{self.used / gib:.2f} GiB in use after loading, {self.peak_activation / gib:.2f} GiB peak "
                f"activations, {self.kv_cache / gib:.2f} GiB KV cache")


def kv_blocks_of_split(split: MemorySplit, cfg: EngineConfig, model_config: ModelConfig, dtype: torch.dtype) -> int:
    """The KV blocks that fit the split's KV share; logs the split."""
    blocks = _blocks_in(split.kv_cache, cfg, model_config, dtype)
    logger.info("memory: %s (%d blocks of %d tokens)", split.describe(), blocks, cfg.block_size)
    return blocks


def profile_peak_activation(model, cfg: EngineConfig, model_config: ModelConfig, device: torch.device,
                            dtype: torch.dtype) -> int:
    """Bytes a forward pass at max_num_batched_tokens (one prompt, every row sampled up to max_num_seqs) allocates
    at its peak beyond what is allocated now, measured on a scratch KV cache just large enough for it."""
    tokens = cfg.max_num_batched_tokens
    blocks = -(-tokens // cfg.block_size)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    caches = allocate_kv_cache(model_config.num_hidden_layers, blocks, cfg.block_size, model.num_kv_heads,
                               model_config.head_dim, dtype, device)
    i32 = dict(dtype=torch.int32, device=device)
    positions = torch.arange(tokens, device=device)
    empty = torch.zeros(0, **i32)
    attn = AttentionMetadata(positions.to(torch.int32), tokens, torch.tensor([0, tokens], **i32),
                             torch.tensor([tokens], **i32), torch.arange(blocks, **i32)[None], empty,
                             torch.zeros(0, blocks, **i32))
    hidden = model.forward(torch.zeros(tokens, dtype=torch.int64, device=device), positions, attn, caches, None)
    rows = min(tokens, cfg.max_num_seqs)
    logits = model.compute_logits(hidden[-rows:], None)
    ones = torch.ones(rows, device=device)
    sample(logits, ones, torch.zeros(rows, **i32), ones, torch.zeros(rows, dtype=torch.int64, device=device),
           torch.zeros(rows, dtype=torch.int64, device=device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del caches, hidden, logits
    torch.cuda.empty_cache()
    return peak


def num_kv_blocks_for(cfg: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
                      model) -> int:
    """`num_kv_blocks`, or, with the weights loaded, what gpu_memory_utilization of the device leaves after what is in
    use and the peak of a profiled forward pass (vLLM's order: load, profile, then size the KV cache)."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    if device.type != "cuda":
        return CPU_NUM_KV_BLOCKS
    peak = profile_peak_activation(model, cfg, model_config, device, dtype)
    free, total = torch.cuda.mem_get_info(device)
    return kv_blocks_of_split(MemorySplit(total, cfg.gpu_memory_utilization, total - free, peak), cfg,
                              model_config, dtype)


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
    split = MemorySplit(int(memory), cfg.gpu_memory_utilization, weights * dtype.itemsize,
                        _activation_bytes(cfg, c, dtype))
    return kv_blocks_of_split(split, cfg, c, dtype)


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


def decode_sms_choices(cfg: EngineConfig, num_sms: int) -> tuple[int, ...]:
    """The decode budgets graphs are captured for: `decode_sms_choices` (or the default), plus the static policy's
    `decode_sms` when it is given; each must leave prefill at least one SM."""
    choices = set(cfg.decode_sms_choices or default_decode_sms_choices(num_sms))
    if cfg.policy == "static" and cfg.decode_sms is not None:
        choices.add(cfg.decode_sms)
    bad = sorted(c for c in choices if c >= num_sms)
    if bad and cfg.policy in ("static", "duet"):
        raise ValueError(f"decode_sms_choices {bad} leave prefill no SM of the {num_sms}")
    return tuple(sorted(c for c in choices if c < num_sms))


def check_tensor_parallel(cfg: EngineConfig, device: torch.device) -> None:
    """On CUDA every rank takes one GPU, cuda:0 to cuda:N-1."""
    size = cfg.tensor_parallel_size
    if size == 1 or device.type != "cuda":
        return
    if device.index not in (None, 0):
        raise ValueError(f"tensor_parallel_size={size} puts rank r on cuda:r; device must be cuda or cuda:0, "
                         f"got {device}")
    if size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={size} needs {size} CUDA devices, one a rank; "
                         f"{torch.cuda.device_count()} are visible")


def start_ranks(cfg: EngineConfig, path, model_config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """The executor of rank 0 with the other ranks spawned and joined (None at tensor_parallel_size 1)."""
    if cfg.tensor_parallel_size == 1:
        return None
    # Imported here: the workers import this module for its KV sizing.
    from minidu.tp_executor import TensorParallelExecutor
    from minidu.tp_worker import WorkerSetup

    return TensorParallelExecutor(WorkerSetup(cfg, path, model_config, dtype, "", device.type))


def build_parts(cfg: EngineConfig) -> EngineParts:
    sim = cfg.backend == "sim"
    device = torch.device("cpu") if sim else resolve_device(cfg.device)
    path, model_config = resolve_model(cfg.model, "dummy" if sim else cfg.load_format)
    check_max_model_len(cfg, model_config)
    dtype = resolve_dtype(cfg.dtype, model_config) if sim else engine_dtype(cfg.dtype, model_config, device)
    if sim:
        return _assemble(cfg, path, model_config, device, dtype, None)
    check_tensor_parallel(cfg, device)
    tp = start_ranks(cfg, path, model_config, dtype, device)
    try:
        return _assemble(cfg, path, model_config, torch.device("cuda", 0) if tp and device.type == "cuda" else device,
                         dtype, tp)
    except BaseException:
        if tp is not None:
            tp.shutdown()
        raise


def _assemble(cfg: EngineConfig, path, model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
              tp) -> EngineParts:
    """Model (rank 0's shard under `tp`), KV cache, scheduler, policy and executor."""
    sim = cfg.backend == "sim"
    hw = hardware_profile(cfg, device)
    num_sms = hw.num_sms if hw is not None else device_num_sms()
    choices = decode_sms_choices(cfg, num_sms)
    latency = LatencyModel(model_shape(model_config, dtype, cfg.tensor_parallel_size), hw) if hw is not None else None
    policy = make_policy(cfg, latency, num_sms, choices)
    if sim:
        num_blocks = sim_num_kv_blocks(cfg, model_config, hw, dtype)
        model = tokenizer = None
    else:
        # The weights first, then the KV cache in what they and a peak forward pass leave (on every rank: the
        # smallest wins).
        model = build_model(path, model_config, dtype=dtype, device=device, load_format=cfg.load_format,
                            seed=cfg.seed, tp=tp.tp if tp is not None else TensorParallel())
        num_blocks = num_kv_blocks_for(cfg, model_config, device, dtype, model)
        if tp is not None:
            num_blocks = tp.agree_num_kv_blocks(num_blocks)
        tokenizer = Tokenizer.from_path(str(path)) if path else None
    capacity = num_blocks * cfg.block_size
    max_model_len = cfg.max_model_len or min(model_config.max_position_embeddings, capacity)
    if max_model_len > capacity:
        raise ValueError(f"max_model_len={max_model_len} does not fit in the KV cache ({num_blocks} blocks of "
                         f"{cfg.block_size} tokens = {capacity}); lower it or give more KV blocks")
    scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, max_model_len),
                          BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching))
    if sim:
        executor = SimulatedExecutor(latency, hw.num_sms, model_config.vocab_size)
    else:
        options = dict(num_kv_blocks=num_blocks, block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                       max_model_len=max_model_len, dtype=dtype, use_cuda_graph=not cfg.enforce_eager,
                       decode_sms_choices=choices if cfg.policy in ("static", "duet") or cfg.decode_sms_choices else ())
        if tp is None:
            executor = ModelRunner(model, model_config, device=device, **options)
        else:
            tp.start_runners(model, model_config, device, options)
            executor = tp
    logger.info("%s (%s backend) on %s, %s: %d KV blocks of %d tokens, max_model_len %d, policy %s%s", cfg.model,
                cfg.backend, hw.name if sim else f"{device}{' (Triton interpreter)' if INTERPRET else ''}", dtype,
                num_blocks, cfg.block_size, max_model_len, cfg.policy,
                f", tensor parallel {cfg.tensor_parallel_size}" if cfg.tensor_parallel_size > 1 else "")
    return EngineParts(model_config, tokenizer, scheduler, executor, policy, max_model_len, latency, num_sms)


def make_policy(cfg: EngineConfig, latency: LatencyModel | None, num_sms: int, choices: tuple[int, ...]):
    """The policy of `cfg`; split policies may only give decode a budget in `choices` (the captured graphs')."""
    if cfg.policy == "aggregated":
        return AggregatedPolicy()
    if cfg.policy == "prefill-first":
        return PrefillFirstPolicy()
    if latency is None:
        raise ValueError(f"policy {cfg.policy!r} needs a latency model: pass hardware= (h100, h200, a100 or a "
                         f"profile JSON) on this device")
    if not choices:
        raise ValueError(f"policy {cfg.policy!r} needs decode_sms_choices below the GPU's {num_sms} SMs")
    if cfg.policy == "static":
        decode_sms = cfg.decode_sms or min(choices, key=lambda c: abs(c - num_sms / 2))
        return StaticPolicy(latency, num_sms, decode_sms, decode_sms_choices=choices)
    if cfg.tbt_slo_ms is None:
        raise ValueError("policy 'duet' needs tbt_slo_ms, the time-between-tokens objective")
    return DuetPolicy(latency, num_sms, cfg.tbt_slo_ms / 1e3, decode_sms_choices=choices)
