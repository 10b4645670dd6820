"""store_kvcache writes each token to its slot in the paged layout, skips -1, and touches nothing else."""
import pytest
import torch
from hypothesis import given, strategies as st

from minidu.kernels.kv_cache import allocate_kv_cache, store_kvcache
from minidu.kernels import tiles as tile_table
from tests.conftest import DEVICE


def random_slots(t: int, num_slots: int, skip_prob: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Distinct slots in random (non-contiguous) order, some replaced by -1."""
    slots = torch.randperm(num_slots, generator=gen)[:t]
    skipped = torch.rand(t, generator=gen) < skip_prob
    return torch.where(skipped, -1, slots).to(dtype)


@given(t=st.sampled_from([0, 1, 2, 5, 13, 17]), hk=st.sampled_from([1, 2, 3, 4]),
       d=st.sampled_from([48, 64, 80, 96, 128, 34]), block_size=st.sampled_from([1, 4, 16]),
       dtype=st.sampled_from([torch.float32, torch.float16]), slot_dtype=st.sampled_from([torch.int32, torch.int64]),
       skip_prob=st.sampled_from([0.0, 0.3, 1.0]), num_sms=st.integers(1, 40),
       tiles=st.sampled_from([64, tile_table.TILE_ELEMS]), seed=st.integers(0, 2**31 - 1))
def test_stores_fused_qkv_views_into_slots(t, hk, d, block_size, dtype, slot_dtype, skip_prob, num_sms, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = 2 * hk
    num_blocks = max(1, -(-(t + 3) // block_size))
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(DEVICE, dtype)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    slots = random_slots(t, num_blocks * block_size, skip_prob, gen, slot_dtype).to(DEVICE)
    caches = [torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype, device=DEVICE) for _ in range(4)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "TILE_ELEMS", tiles)
        store_kvcache(k, v, caches[0], caches[1], slots, num_sms=num_sms)
        store_kvcache(k, v, caches[2], caches[3], slots, num_sms=1)
    stored = slots >= 0
    for cache, src in ((caches[0], k), (caches[1], v)):
        flat = cache.view(-1, hk, d)
        block_ids, offsets = slots[stored].long() // block_size, slots[stored].long() % block_size
        assert torch.equal(cache[block_ids, offsets], src[stored])
        untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[slots[stored].long()] = False
        assert flat[untouched].isnan().all()
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)) and torch.equal(a.isnan(), b.isnan())


def test_allocate_kv_cache():
    caches = allocate_kv_cache(3, 5, 16, 2, 80, torch.float16, "cpu")
    assert len(caches) == 3
    pointers = set()
    for k_cache, v_cache in caches:
        for cache in (k_cache, v_cache):
            assert cache.shape == (5, 16, 2, 80) and cache.dtype == torch.float16 and cache.is_contiguous()
            assert (cache == 0).all()
            pointers.add(cache.data_ptr())
    assert len(pointers) == 6
    for name, bad in (("num_layers", 0), ("num_blocks", -1), ("block_size", 1.5), ("num_kv_heads", True)):
        args = dict(num_layers=1, num_blocks=2, block_size=4, num_kv_heads=1, head_dim=8) | {name: bad}
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            allocate_kv_cache(**args, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        allocate_kv_cache(1, 2, 4, 1, 8, torch.int32, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are only exact on CUDA")
def test_bf16_cuda():
    gen = torch.Generator().manual_seed(0)
    (k_cache, v_cache), = allocate_kv_cache(1, 64, 16, 8, 128, torch.bfloat16, "cuda")
    k = torch.randn(100, 8, 128, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(100, 8, 128, generator=gen).to("cuda", torch.bfloat16)
    slots = random_slots(100, 64 * 16, 0.2, gen, torch.int32).cuda()
    store_kvcache(k, v, k_cache, v_cache, slots, num_sms=7)
    stored = slots >= 0
    assert torch.equal(k_cache.view(-1, 8, 128)[slots[stored].long()], k[stored])
    assert torch.equal(v_cache.view(-1, 8, 128)[slots[stored].long()], v[stored])


def test_bad_inputs_name_the_argument():
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    k_cache, v_cache = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    slots = torch.tensor([0, 5, -1])
    cases = [
        (dict(k=k.long()), "k"),
        (dict(k=torch.randn(3, 16)), "k"),
        (dict(k=torch.randn(3, 8, 2).transpose(1, 2)), "k"),
        (dict(v=torch.randn(3, 2, 7)), "v"),
        (dict(v=v.half()), "v"),
        (dict(k_cache=torch.zeros(4, 4, 2, 7)), "k_cache"),
        (dict(k_cache=k_cache.half()), "k_cache"),
        (dict(k_cache=torch.zeros(4, 4, 8, 2).transpose(2, 3)), "k_cache"),
        (dict(v_cache=torch.zeros(5, 4, 2, 8)), "v_cache"),
        (dict(slot_mapping=slots.float()), "slot_mapping"),
        (dict(slot_mapping=slots[:2]), "slot_mapping"),
        (dict(num_sms=0), "num_sms"),
    ]
    for override, name in cases:
        args = dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots) | override
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            store_kvcache(args.pop("k"), args.pop("v"), args.pop("k_cache"), args.pop("v_cache"),
                          args.pop("slot_mapping"), **args)
