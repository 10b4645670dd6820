"""Rotary position embedding (rotate-half, as in HF Llama/NeoX) applied in place to q and k, optionally storing the
rotated k and v in the paged KV cache in the same launch, plus the host-side inverse frequencies and cos/sin scale of
transformers' default, linear, dynamic, Llama-3 and YaRN rope."""
import math

import torch
import triton
import triton.language as tl

from minidu.kernels import tiles as tile_table
from minidu.kernels.kv_cache import check_kv_store_inputs
from minidu.kernels.utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, next_power_of_2, num_programs

def rotary_tiles(num_tokens: int, num_heads: int, head_dim: int, tile_elems: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_HEADS, BLOCK_HALF, num_warps) for num_tokens tokens of num_heads q and k heads together."""
    block_heads, block_half = next_power_of_2(num_heads), next_power_of_2(head_dim // 2)
    token_elems = block_heads * block_half
    block_t = max(1, min(next_power_of_2(max(num_tokens, 1)), tile_elems // token_elems))
    return block_t, block_heads, block_half, min(8, max(1, block_t * token_elems // 512))


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32 as Hugging Face transformers computes them (fp32, same op order).

    rope_scaling is the config's dict: None or rope_type "default" (no scaling), "linear" (all frequencies divided by
    factor), "dynamic" (NTK scaling, which transformers applies only past max_position_embeddings: below it, the
    default frequencies), "llama3" (low frequencies divided by factor, high ones kept, a smooth blend in between) or
    "yarn" (frequencies blended between interpolated and extrapolated over a correction range; see
    rope_attention_factor for its cos/sin scale). The legacy key "type" is read when "rope_type" is absent.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
        raise ValueError(f"rope_theta must be positive, got {rope_theta!r}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (float(rope_theta) ** exponents)
    rope_type = _rope_type(rope_scaling)
    if rope_type in ("default", "dynamic"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / _scaling_value(rope_scaling, "factor")
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope_scaling)
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, float(rope_theta), rope_scaling)
    raise ValueError(f"rope_scaling has unsupported rope_type {rope_type!r}; "
                     f"supported: 'default', 'linear', 'dynamic', 'llama3', 'yarn'")


def rope_attention_factor(rope_scaling: dict | None) -> float:
    """The factor transformers multiplies cos and sin by: 1, except for yarn (its attention_factor, else derived from
    factor, mscale and mscale_all_dim)."""
    if _rope_type(rope_scaling) != "yarn":
        return 1.0
    factor = _scaling_value(rope_scaling, "factor")
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _rope_type(rope_scaling: dict | None) -> str:
    if rope_scaling is None:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, rope_scaling: dict) -> torch.Tensor:
    factor = _scaling_value(rope_scaling, "factor")
    original = _scaling_value(rope_scaling, "original_max_position_embeddings")
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits num_rotations times in the original context.
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def _scaling_value(rope_scaling: dict, key: str) -> float:
    if key not in rope_scaling:
        raise ValueError(f"rope_scaling is missing {key!r}")
    return float(rope_scaling[key])


def _llama3_scaled(inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    factor = _scaling_value(rope_scaling, "factor")
    low_freq_factor = _scaling_value(rope_scaling, "low_freq_factor")
    high_freq_factor = _scaling_value(rope_scaling, "high_freq_factor")
    old_context_len = _scaling_value(rope_scaling, "original_max_position_embeddings")
    if high_freq_factor == low_freq_factor:
        raise ValueError("rope_scaling needs high_freq_factor != low_freq_factor")
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than the original context are interpolated (divided by factor); short ones are kept.
    long_scaled = torch.where(wavelen > old_context_len / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * long_scaled / factor + smooth * long_scaled
    is_medium = (wavelen >= old_context_len / high_freq_factor) & (wavelen <= old_context_len / low_freq_factor)
    return torch.where(is_medium, blended, long_scaled)


@triton.jit(do_not_specialize=["num_tokens", "num_tiles", "NUM_PROGRAMS"])
def _rotary_kernel(
    q_ptr,  # [T, Hq, D], strides (stride_qt, D, 1)
    k_ptr,  # [T, Hk, D], strides (stride_kt, D, 1)
    v_ptr,  # [T, Hk, D], strides (stride_vt, D, 1); unused unless STORE_KV
    k_cache_ptr,  # [num_blocks, block_size, Hk, D] contiguous; unused unless STORE_KV
    v_cache_ptr,  # [num_blocks, block_size, Hk, D] contiguous; unused unless STORE_KV
    slot_mapping_ptr,  # [T]; unused unless STORE_KV
    positions_ptr,  # [T]
    inv_freq_ptr,  # [D // 2] float32
    num_tokens, stride_qt, stride_kt, stride_vt, num_tiles, NUM_PROGRAMS,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF_DIM: tl.constexpr, COS_SIN_SCALE: tl.constexpr,
    STORE_KV: tl.constexpr, EVEN_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    TILE: tl.constexpr = (BLOCK_T, BLOCK_HEADS, BLOCK_HALF)
    # Lanes [0, Hq) of the head axis are q's heads and lanes [Hq, Hq + Hk) k's, so one pass rotates both. Per-lane
    # values are built once, as [1, BLOCK_HEADS, 1] or [1, 1, BLOCK_HALF]; masks are broadcast to the whole tile once
    # rather than by every load and store (the interpreter pays per op). int64 indices: see kernels/utils.py.
    dims = tl.arange(0, BLOCK_HALF).to(tl.int64)[None, None, :]
    kv_heads = tl.arange(0, BLOCK_HEADS).to(tl.int64)[None, :, None] - NUM_Q_HEADS  # < 0 on q's lanes
    is_q = kv_heads < 0
    lane_mask = kv_heads < NUM_KV_HEADS
    if BLOCK_HALF == HALF_DIM:
        inv_freq = tl.load(inv_freq_ptr + dims)
    else:
        inv_freq = tl.load(inv_freq_ptr + dims, mask=dims < HALF_DIM, other=0.0)
        lane_mask = lane_mask & (dims < HALF_DIM)
    lane_base = tl.where(is_q, q_ptr + NUM_Q_HEADS * 2 * HALF_DIM, k_ptr)  # [1, BLOCK_HEADS, 1]
    lane_stride = tl.where(is_q, stride_qt, stride_kt).to(tl.int64)
    if STORE_KV:
        kv_lane_mask = lane_mask & (kv_heads >= 0)
    tile_tokens = tl.arange(0, BLOCK_T).to(tl.int64)[:, None, None]
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        tokens = tile * BLOCK_T + tile_tokens
        if EVEN_T:
            positions = tl.load(positions_ptr + tokens).to(tl.float32)
            mask = tl.broadcast_to(lane_mask, TILE)
        else:
            token_mask = tokens < num_tokens
            positions = tl.load(positions_ptr + tokens, mask=token_mask, other=0).to(tl.float32)
            mask = tl.broadcast_to(token_mask & lane_mask, TILE)
        # One cos/sin per (token, frequency), shared by every q and k head of the token.
        angles = positions * inv_freq
        cos, sin = tl.cos(angles), tl.sin(angles)
        if COS_SIN_SCALE != 1.0:
            cos, sin = cos * COS_SIN_SCALE, sin * COS_SIN_SCALE
        cos, sin = tl.broadcast_to(cos, TILE), tl.broadcast_to(sin, TILE)
        # Heads are 2 * HALF_DIM apart in q, k, v (checked by the launcher) and in a cache slot.
        head_offsets = kv_heads * (2 * HALF_DIM) + dims
        ptrs1 = lane_base + (tokens * lane_stride + head_offsets)
        ptrs2 = ptrs1 + HALF_DIM
        # Masked-out lanes are never stored, so their loads need no `other`.
        x1 = tl.load(ptrs1, mask=mask).to(tl.float32)
        x2 = tl.load(ptrs2, mask=mask).to(tl.float32)
        # rotate_half: [x1, x2] -> [-x2, x1], so out = x * cos + rotate_half(x) * sin.
        y1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
        tl.store(ptrs1, y1, mask=mask)
        tl.store(ptrs2, y2, mask=mask)
        if STORE_KV:
            # The k lanes of tokens with a slot (-1: not stored) go to the cache, and v's row beside them: the
            # launch store_kvcache would otherwise need, and k is not read back from memory.
            if EVEN_T:
                slots = tl.load(slot_mapping_ptr + tokens).to(tl.int64)
            else:
                slots = tl.load(slot_mapping_ptr + tokens, mask=token_mask, other=-1).to(tl.int64)
            kv_mask = tl.broadcast_to((slots >= 0) & kv_lane_mask, TILE)
            slot_offsets = slots * (NUM_KV_HEADS * 2 * HALF_DIM) + head_offsets
            k_slots = k_cache_ptr + slot_offsets
            tl.store(k_slots, y1, mask=kv_mask)
            tl.store(k_slots + HALF_DIM, y2, mask=kv_mask)
            v_rows, v_slots = v_ptr + (tokens * stride_vt + head_offsets), v_cache_ptr + slot_offsets
            tl.store(v_slots, tl.load(v_rows, mask=kv_mask), mask=kv_mask)
            tl.store(v_slots + HALF_DIM, tl.load(v_rows + HALF_DIM, mask=kv_mask), mask=kv_mask)


def _check_heads(name: str, t, dtype: torch.dtype | None, device: torch.device | None) -> None:
    check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES if dtype is None else (dtype,), device=device)
    check_token_rows(name, t)


def check_token_rows(name: str, t: torch.Tensor) -> None:
    """The kernel addresses a token's heads as one contiguous [H, D] row (as in a view of the fused qkv output)."""
    if t.stride(-1) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        raise ValueError(f"{name} must be contiguous within each token (strides (any, {t.shape[2]}, 1)), "
                         f"got strides {t.stride()}")


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *,
                     attention_factor: float = 1.0, num_sms: int | None = None) -> None:
    """Rotates q [T, Hq, D] and k [T, Hk, D] in place by angle positions[t] * inv_freq (rotate-half convention), with
    cos and sin multiplied by attention_factor (yarn's; 1 otherwise).

    q and k may be views of the fused qkv output: tokens may be strided, each token's [H, D] must be contiguous;
    positions [T] int; inv_freq [D // 2] float32 from rope_inv_freq. Angles, cos/sin and the rotation run in fp32.
    """
    _check_rotary_inputs(q, k, positions, inv_freq, attention_factor)
    _launch(q, k, None, positions, inv_freq, attention_factor, num_sms)


def rotary_embedding_and_store_kvcache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                       inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       slot_mapping: torch.Tensor, *, attention_factor: float = 1.0,
                                       num_sms: int | None = None) -> None:
    """rotary_embedding(q, k, ...) then store_kvcache(k, v, k_cache, v_cache, slot_mapping) in one launch: the
    rotated k and v [T, Hk, D] of every token whose slot is not -1 go to the paged cache (see kernels/kv_cache.py)."""
    _check_rotary_inputs(q, k, positions, inv_freq, attention_factor)
    check_kv_store_inputs(k, v, k_cache, v_cache, slot_mapping)
    check_token_rows("v", v)
    _launch(q, k, (v, k_cache, v_cache, slot_mapping), positions, inv_freq, attention_factor, num_sms)


def _check_rotary_inputs(q, k, positions, inv_freq, attention_factor) -> None:
    _check_heads("q", q, None, None)
    _check_heads("k", k, q.dtype, q.device)
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim == 0 or head_dim % 2:
        raise ValueError(f"q must have an even, non-zero head_dim, got shape {tuple(q.shape)}")
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k has shape {tuple(k.shape)}, expected ({num_tokens}, Hk, {head_dim})")
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=q.device, shape=(num_tokens,),
                 contiguous=True)
    if not (isinstance(attention_factor, (int, float)) and math.isfinite(attention_factor) and attention_factor > 0):
        raise ValueError(f"attention_factor must be a positive finite number, got {attention_factor!r}")
    check_tensor("inv_freq", inv_freq, ndim=1, dtypes=(torch.float32,), device=q.device, shape=(head_dim // 2,),
                 contiguous=True)


def _launch(q, k, store, positions, inv_freq, attention_factor, num_sms) -> None:
    """`store`: None, or (v, k_cache, v_cache, slot_mapping) to write the rotated k and v to the cache."""
    num_tokens, num_q_heads, head_dim = q.shape
    block_t, block_heads, block_half, num_warps = rotary_tiles(num_tokens, num_q_heads + k.shape[1], head_dim,
                                                               tile_table.ROTARY_TILE_ELEMS)
    num_tiles = triton.cdiv(num_tokens, block_t)
    grid = num_programs(num_tiles, num_sms, q.device)
    # Without a store, k, q and positions stand in for the unused v, cache and slot pointers (never dereferenced).
    v, k_cache, v_cache, slot_mapping = store if store is not None else (k, q, q, positions)
    _rotary_kernel[(grid,)](
        q, k, v, k_cache, v_cache, slot_mapping, positions, inv_freq,
        num_tokens, q.stride(0), k.stride(0), v.stride(0), num_tiles, grid,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=k.shape[1], HALF_DIM=head_dim // 2,
        COS_SIN_SCALE=float(attention_factor), STORE_KV=store is not None, EVEN_T=num_tokens % block_t == 0,
        BLOCK_T=block_t, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
