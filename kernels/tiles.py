"""Tile tables, one per backend: compiled CUDA kernels get tiles chosen for the GPU (within the target's shared-memory
limit, with a reduction order that depends on the problem's fixed dimensions only), the CPU interpreter gets tiles
chosen by its per-program cost model. Every launcher takes its tile shapes from here."""
import functools
from dataclasses import dataclass

import triton

from minidu.kernels.utils import INTERPRET, next_power_of_2


@dataclass(frozen=True, slots=True)
class CudaTarget:
    """What tile choice needs to know about a GPU: its compute capability and shared memory per block."""

    capability: int
    shared_memory: int  # bytes a block may use (the opt-in maximum)


# Opt-in shared memory per block: 227 KB on sm_90 (H100/H200), 163 KB on sm_80 (A100).
SM90 = CudaTarget(90, 232448)
SM80 = CudaTarget(80, 166912)


def cuda_target(capability: int) -> CudaTarget:
    """The tile target of a device of compute capability major*10+minor (sm_80 limits for anything before sm_90)."""
    return SM90 if capability >= 90 else SM80


# ---- row-wise kernels (RMSNorm, SwiGLU, row gathers, KV-cache stores) ----

# Elements per tile and widest column strip: the interpreter pays per program and per op rather than per element, so
# it gets few big tiles (tests shrink these to force many tiles). Read at call time, so tests can patch them here.
TILE_ELEMS = 131072 if INTERPRET else 4096
TILE_COLS = 16384 if INTERPRET else 1024


# ---- GEMM ----

@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def gemm_shared_bytes(cfg: GemmConfig, itemsize: int) -> int:
    """Shared memory a software-pipelined tile needs: num_stages buffers of an x tile and a w tile."""
    return cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * itemsize


def cuda_gemm_config(n: int, k: int, itemsize: int, target: CudaTarget = SM90) -> GemmConfig:
    """CUDA tiles from (N, K, dtype) only, never M: every row of the output is then reduced over K in the same
    BLOCK_K steps by the same MMA instruction whatever the batch, so a token's logits do not depend on which other
    tokens share its step. 64-row tiles suit both decode (few rows, weight-bandwidth bound) and prefill; wide
    outputs take 128-column tiles (8 warps, so the sm_80 accumulators do not spill), narrower ones 64 so a decode
    step still spreads over most SMs."""
    if itemsize == 4:
        # ieee fp32 runs on CUDA cores: register-light tiles.
        block_m, block_n, block_k = 32, 64, 32
    else:
        block_m, block_n, block_k = 64, (128 if n >= 16384 else 64), 64
    # Pipelining depth only overlaps loads with math; it never changes the arithmetic, so it may follow the target.
    for stages in (4, 3, 2, 1):
        cfg = GemmConfig(block_m, block_n, block_k, num_warps=8 if block_n == 128 else 4, num_stages=stages)
        if gemm_shared_bytes(cfg, itemsize) <= target.shared_memory:
            return cfg
    raise ValueError(f"no GEMM tile for N={n}, K={k} fits in {target.shared_memory} bytes of shared memory")


# Interpreter cost model (seconds, fitted on a 2-core AMD EPYC host): every tile and every K step pays for its ops
# in Python; every loaded weight element (wrapped rows and masked columns included) for its word-packed gather,
# unpacking and dot in numpy, about twice as much when K needs masks (every step then builds and applies them).
_TILE_COST, _STEP_COST, _ELEM_COST, _MASKED_ELEM_COST, _MAC_COST = 5e-4, 4e-4, 6e-9, 1.1e-8, 2e-11
# Bigger tiles cost more per element: their numpy temporaries spill out of the caches.
_MAX_INTERPRET_TILE = 2 ** 19


def _interpret_cost(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int) -> float:
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    elem_cost = _ELEM_COST if k % block_k == 0 else _MASKED_ELEM_COST
    return tiles * (_TILE_COST + steps * (_STEP_COST + block_n * block_k * (elem_cost + block_m * _MAC_COST)))


@functools.cache  # the search costs ~5 ms, and a model has a handful of GEMM shapes per batch size
def interpret_gemm_config(m: int, n: int, k: int, whole_rows: bool = False) -> GemmConfig:
    """All rows of a short batch share one tile row (so the weight is read once), and (BLOCK_N, BLOCK_K) minimise the
    interpreter's cost model. These tiles depend on M: interpreted GEMMs are budget-invariant, not batch-invariant.
    `whole_rows`: BLOCK_N = next_power_of_2(N), one column tile, as the RMSNorm epilogue needs."""
    block_m = max(1, min(64, next_power_of_2(max(m, 1))))
    widths = [next_power_of_2(n)] if whole_rows else [2 ** i for i in range(4, 15)]
    candidates = [(bn, bk) for bn in widths for bk in (2 ** i for i in range(4, 11))
                  if bn * bk <= _MAX_INTERPRET_TILE and bn <= max(16, next_power_of_2(n))
                  and bk <= max(16, next_power_of_2(k))]
    block_n, block_k = min(candidates, key=lambda c: _interpret_cost(m, n, k, block_m, *c))
    return GemmConfig(block_m, block_n, block_k)


# The MLP's SwiGLU as the down projection's prologue (gemm(..., silu_mul=True)) saves the interpreter a launch per
# layer; compiled, its fp32 gate/up tiles spill registers on sm_80 (bf16, Qwen3-8B's down projection), so CUDA runs
# silu_and_mul and the GEMM as two kernels until the fused one is measured on a GPU.
SILU_MUL_PROLOGUE = INTERPRET


# The residual add and the next RMSNorm as a GEMM's epilogue (gemm(..., norm_weight=)) save the interpreter the norm's
# launch (61 a step for a 30-layer model); the epilogue needs whole rows in one tile, which the interpreter's
# cost model affords up to NORM_EPILOGUE_MAX_N columns. CUDA keeps its tiles and runs rms_norm as its own kernel.
NORM_EPILOGUE_MAX_N = 16384


def norm_epilogue(n: int) -> bool:
    """Whether a GEMM with N output columns runs the following RMSNorm as its epilogue."""
    return INTERPRET and n <= NORM_EPILOGUE_MAX_N


def weight_pack(itemsize: int, aligned: bool) -> int:
    """Weight elements per 64-bit load (the kernel's W_PACK): 8 // itemsize in the interpreter when the weight's rows
    are whole aligned words, else 1. The interpreter gathers every loaded element separately, so loading the weight as
    uint64 words and unpacking them with shifts makes its GEMMs about 1.7x faster; compiled kernels always load plain
    elements (W_PACK = 1), their vectorised loads already move whole words."""
    pack = 8 // itemsize
    return pack if INTERPRET and pack > 1 and aligned else 1


# ---- paged attention ----

def kv_heads_per_tile(num_kv_heads: int) -> int:
    """KV heads one attention tile serves (the kernels' KV_PER_TILE): all of them in the interpreter, which pays per
    tile and per op (the block-diagonal score mask wastes FLOPs, not ops); one on CUDA, which spreads heads over SMs
    and makes the mask all-true."""
    return next_power_of_2(num_kv_heads) if INTERPRET else 1


@dataclass(frozen=True, slots=True)
class DecodeTiles:
    block_n: int  # keys per inner step
    partition_size: int  # keys per split: fixed, so a request's splits never depend on the batch or its tables
    num_warps: int


CUDA_DECODE_TILES = DecodeTiles(block_n=64, partition_size=256, num_warps=4)
# The interpreter runs one program at a time, so splitting a context only adds tiles and a merge launch: its splits
# hold up to 4096 keys, more than its contexts reach (tests shrink them to merge).
INTERPRET_DECODE_TILES = DecodeTiles(block_n=64, partition_size=4096, num_warps=4)


def decode_tiles() -> DecodeTiles:
    """The decode-attention tiles of this backend (read at call time, so tests may patch them here)."""
    return INTERPRET_DECODE_TILES if INTERPRET else CUDA_DECODE_TILES


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    block_m: int  # new tokens per tile (each brings `group_pad` query-head rows)
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


# Elements of an interpreted tile's [rows, KV_PER_TILE * BLOCK_N] score matrix: the interpreter pays per program and
# per op, so a tile takes as many new tokens as fit (a 36-token prompt of SmolLM2 in one tile instead of three), up
# to 2**18 elements, past which numpy's temporaries leave the caches. Read at call time: tests shrink it to force
# several q-blocks per request.
INTERPRET_SCORE_ELEMS = 2 ** 18
INTERPRET_PREFILL_BLOCK_N = 64


def interpret_prefill_tiles(group_pad: int, kv_per_tile: int) -> PrefillTiles:
    rows_per_token = kv_per_tile * group_pad
    block_m = max(1, INTERPRET_SCORE_ELEMS // (rows_per_token * kv_per_tile * INTERPRET_PREFILL_BLOCK_N))
    return PrefillTiles(block_m=block_m, block_n=INTERPRET_PREFILL_BLOCK_N, num_warps=4, num_stages=1)


def cuda_prefill_tiles(group_pad: int, head_dim_pad: int, itemsize: int) -> PrefillTiles:
    """128 query rows (64 for fp32, whose 128-row tiles would spill registers, and for head_dim > 128), from the head
    shape only."""
    rows = 128 if head_dim_pad <= 128 and itemsize < 4 else 64
    block_m = max(1, rows // group_pad)
    num_warps = 8 if block_m * group_pad * head_dim_pad >= 128 * 128 else 4
    # fp32 K/V tiles are twice as large, so fewer of them fit in shared memory for pipelining.
    return PrefillTiles(block_m=block_m, block_n=64 if itemsize < 4 else 32, num_warps=num_warps,
                        num_stages=2 if itemsize == 4 else 3)


# ---- rotary embedding + KV store ----

# Elements per tile: the interpreter pays per program and per op rather than per element, so it gets few big tiles
# (tests shrink this to force many tiles). Read at call time.
CUDA_ROTARY_TILE_ELEMS = 4096
ROTARY_TILE_ELEMS = 131072 if INTERPRET else CUDA_ROTARY_TILE_ELEMS


# ---- sampling ----

# Elements of an interpreted [ROWS, SCAN_V] chunk of the passes that only take maxima (the greedy pass and the race):
# their result does not depend on how the row is chunked, so the interpreter, which pays per op, scans the
# vocabulary in as few chunks as fit (SmolLM2's 49152 logits: one instead of 24). Read at call time: tests shrink it.
INTERPRET_SCAN_ELEMS = 131072


# ---- register pressure: tiles the ahead-of-time compile test (tests/kernels/test_aot_compile.py) found to spill ----

def cuda_decode_num_warps(head_dim_pad: int) -> int:
    """Warps of a compiled decode-attention tile: 8 from head_dim 128 on, where 4 spilled registers on sm_90 and
    sm_80 (the [16, 128] fp32 accumulator beside the K and V tiles' pointers)."""
    return 8 if head_dim_pad >= 128 else 4


def cuda_prefill_tiles_within_registers(group_pad: int, head_dim_pad: int, itemsize: int) -> PrefillTiles:
    """cuda_prefill_tiles in half precision with 8 warps, and from head_dim 128 on 64 query rows and 32-key steps: the
    128-row, 64-key or 4-warp tiles spilled registers there on sm_90 or sm_80 (8 to 3500 bytes). fp32 keeps its
    tiles."""
    tiles = cuda_prefill_tiles(group_pad, head_dim_pad, itemsize)
    if itemsize == 4:
        return tiles
    if head_dim_pad >= 128:
        return PrefillTiles(max(1, 64 // group_pad), 32, 8, tiles.num_stages)
    return PrefillTiles(tiles.block_m, tiles.block_n, 8, tiles.num_stages)
