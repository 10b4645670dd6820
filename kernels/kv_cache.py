"""The paged KV cache: this docstring is where its layout is defined, and store_kvcache writes new tokens into it.

Per decoder layer there is a pair (k_cache, v_cache), each a contiguous tensor
[num_blocks, block_size, num_kv_heads, head_dim]. A request owns a list of blocks (its row of block_tables); its token
at position p lives in block block_tables[p // block_size] at offset p % block_size, i.e. in cache slot
slot = block_id * block_size + offset_in_block, which addresses k_cache.view(-1, num_kv_heads, head_dim)[slot].
A slot_mapping entry of -1 means "do not store this token" (e.g. padding).
"""
import torch
import triton
import triton.language as tl

from minidu.kernels import tiles
from minidu.kernels.utils import (FLOAT_DTYPES, INDEX_DTYPES, check_tensor, next_power_of_2, num_programs,
                                  resolve_num_sms)



def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One zero-filled (k_cache, v_cache) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim].

    Zero rather than empty so that a kernel reading a whole block never meets NaN garbage in unused slots.
    """
    sizes = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
                 head_dim=head_dim)
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]


@triton.jit(do_not_specialize=["num_tokens", "num_tiles", "NUM_PROGRAMS"])
def _store_kvcache_kernel(
    k_ptr,  # [T, Hk, D], strides (stride_kt, stride_kh, 1)
    v_ptr,  # [T, Hk, D], strides (stride_vt, stride_vh, 1)
    k_cache_ptr,  # [num_blocks, block_size, Hk, D] contiguous
    v_cache_ptr,  # [num_blocks, block_size, Hk, D] contiguous
    slot_mapping_ptr,  # [T]
    num_tokens, num_kv_heads, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_tiles, NUM_PROGRAMS,
    BLOCK_T: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 indices: see the interpreter notes in kernels/utils.py.
    heads = tl.arange(0, BLOCK_HK).to(tl.int64)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    tile_tokens = tl.arange(0, BLOCK_T).to(tl.int64)
    head_dim_mask = (heads < num_kv_heads)[:, None] & (dims < head_dim)[None, :]
    # Offsets of (head, dim) inside one cache slot and inside one k/v token row.
    slot_offsets = (heads * head_dim)[:, None] + dims[None, :]
    k_offsets = (heads * stride_kh)[:, None] + dims[None, :]
    v_offsets = (heads * stride_vh)[:, None] + dims[None, :]
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        tokens = tile * BLOCK_T + tile_tokens
        slots = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
        mask = (slots >= 0)[:, None, None] & head_dim_mask[None, :, :]
        cache_offsets = (slots * num_kv_heads * head_dim)[:, None, None] + slot_offsets[None, :, :]
        k = tl.load(k_ptr + (tokens * stride_kt)[:, None, None] + k_offsets[None, :, :], mask=mask)
        tl.store(k_cache_ptr + cache_offsets, k, mask=mask)
        v = tl.load(v_ptr + (tokens * stride_vt)[:, None, None] + v_offsets[None, :, :], mask=mask)
        tl.store(v_cache_ptr + cache_offsets, v, mask=mask)


def _check_cache(name: str, cache, like: torch.Tensor) -> None:
    check_tensor(name, cache, ndim=4, dtypes=(like.dtype,), device=like.device,
                 shape=(None, None, like.shape[1], like.shape[2]), contiguous=True)


def check_kv_store_inputs(k, v, k_cache, v_cache, slot_mapping) -> None:
    """The checks of every launcher that stores k/v into the cache; ValueError naming the argument."""
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=3, dtypes=(k.dtype,), device=k.device, shape=tuple(k.shape))
    for name, t in (("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    _check_cache("k_cache", k_cache, k)
    _check_cache("v_cache", v_cache, k)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, expected k_cache's {tuple(k_cache.shape)}")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=k.device, shape=(k.shape[0],),
                 contiguous=True)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, *, num_sms: int | None = None) -> None:
    """Writes k[t], v[t] ([T, Hk, D], strided views allowed, last dim contiguous) into cache slot slot_mapping[t].

    Tokens whose slot is -1 are skipped. Slots must be < num_blocks * block_size and distinct (unchecked: that would
    need a device sync).
    """
    check_kv_store_inputs(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape

    block_hk, block_d = next_power_of_2(max(num_kv_heads, 1)), next_power_of_2(max(head_dim, 1))
    block_t = max(1, min(next_power_of_2(max(num_tokens, 1)), tiles.TILE_ELEMS // (block_hk * block_d)))
    num_tiles = triton.cdiv(num_tokens, block_t)
    grid = num_programs(num_tiles, num_sms, k.device)
    _store_kvcache_kernel[(grid,)](
        k, v, k_cache, v_cache, slot_mapping, num_tokens, num_kv_heads, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), num_tiles, grid,
        BLOCK_T=block_t, BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=4,
    )


def check_paged_attention_inputs(q, k_cache, v_cache, seq_lens, block_tables, out, num_sms,
                                 num_seqs: int | None = None) -> None:
    """The checks both paged attention launchers share: q [*, Hq, D] against the cache layout, seq_lens and block
    tables of one row per request (`num_seqs` of them; None: as many as seq_lens has), an optional out like q;
    ValueError naming the argument."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    resolve_num_sms(num_sms, device)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=device, shape=tuple(k_cache.shape))
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} does not match q head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of k_cache kv heads ({num_kv_heads})")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=device, contiguous=True,
                 shape=None if num_seqs is None else (num_seqs,))
    check_tensor("block_tables", block_tables, ndim=2, dtypes=INDEX_DTYPES, device=device,
                 shape=(seq_lens.shape[0], None))
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must have a contiguous last dimension")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), device=device, shape=tuple(q.shape))
        if out.stride(-1) != 1:
            raise ValueError("out must have a contiguous last dimension")
