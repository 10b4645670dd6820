"""gather_rows gathers exactly the rows torch indexing gathers."""
import pytest
import torch
from hypothesis import given, strategies as st

from minidu.kernels.gather import gather_rows
from minidu.kernels import tiles as tile_table
from tests.conftest import DEVICE


@given(t=st.sampled_from([0, 1, 2, 5, 13, 31]), vocab=st.sampled_from([1, 7, 50, 1000]),
       hidden=st.sampled_from([1, 48, 64, 80, 96, 100]), dtype=st.sampled_from([torch.float32, torch.float16]),
       ids_dtype=st.sampled_from([torch.int32, torch.int64]), pad=st.sampled_from([0, 3]),
       num_sms=st.integers(1, 40),
       tiles=st.sampled_from([(64, 32), (tile_table.TILE_ELEMS, tile_table.TILE_COLS)]),
       seed=st.integers(0, 2**31 - 1))
def test_gathers_rows(t, vocab, hidden, dtype, ids_dtype, pad, num_sms, tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, hidden + pad, generator=gen).to(DEVICE, dtype)[:, :hidden]
    ids = torch.randint(0, vocab, (t,), generator=gen, dtype=ids_dtype).to(DEVICE)
    out = torch.full((t, hidden), float("nan"), dtype=dtype, device=DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "TILE_ELEMS", tiles[0])
        mp.setattr(tile_table, "TILE_COLS", tiles[1])
        result = gather_rows(ids, table, num_sms=num_sms, out=out)
        single = gather_rows(ids, table, num_sms=1)
    assert result is out
    assert torch.equal(out, table[ids.long()])
    assert torch.equal(single, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are only exact on CUDA")
def test_bf16_cuda():
    table = torch.randn(5000, 2048, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 5000, (37,), device="cuda", dtype=torch.int32)
    assert torch.equal(gather_rows(ids, table, num_sms=5), table[ids.long()])


def test_bad_inputs_name_the_argument():
    ids, table = torch.tensor([0, 2]), torch.randn(4, 8)
    cases = [
        (dict(ids=ids.float()), "ids"),
        (dict(ids=ids[None]), "ids"),
        (dict(ids=torch.tensor([0, 1, 2, 3])[::2]), "ids"),
        (dict(table=torch.randn(8)), "table"),
        (dict(table=table.long()), "table"),
        (dict(table=torch.randn(8, 4).t()), "table"),
        (dict(out=torch.empty(2, 7)), "out"),
        (dict(out=torch.empty(2, 8, dtype=torch.float16)), "out"),
        (dict(num_sms=0), "num_sms"),
    ]
    for override, name in cases:
        args = dict(ids=ids, table=table) | override
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            gather_rows(args.pop("ids"), args.pop("table"), **args)


@given(vocab=st.sampled_from([1, 7, 50]), shards=st.integers(1, 4), hidden=st.sampled_from([1, 48, 100]),
       dtype=st.sampled_from([torch.float32, torch.float16]), num_sms=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_vocab_shards_sum_to_the_whole_lookup(vocab, shards, hidden, dtype, num_sms, seed):
    """Each shard gives its own ids' rows and zeros elsewhere, so the shards' outputs add up to the unsharded lookup
    (the vocab-parallel embedding's all-reduce)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, hidden, generator=gen).to(DEVICE, dtype)
    ids = torch.randint(0, vocab, (11,), generator=gen).to(DEVICE)
    rows = -(-vocab // shards)
    total = torch.zeros(11, hidden, dtype=torch.float64, device=DEVICE)
    for start in range(0, rows * shards, rows):
        shard = table[start:start + rows]
        if shard.shape[0] == 0:
            continue
        out = gather_rows(ids, shard, row_start=start, num_sms=num_sms)
        inside = (ids >= start) & (ids < start + shard.shape[0])
        assert torch.equal(out[~inside], torch.zeros_like(out[~inside]))
        assert torch.equal(out[inside], table[ids[inside]])
        total += out.double()
    assert torch.equal(total, table[ids].double())


def test_bad_row_start_is_refused():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="^row_start"):
            gather_rows(torch.tensor([0]), torch.randn(4, 8), row_start=bad)
