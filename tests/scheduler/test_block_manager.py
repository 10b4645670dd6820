"""Block manager: reference counts, prefix-cache hits through chained hashes, LRU reuse of freed blocks."""
from hypothesis import given, strategies as st

from minidu.scheduler.block_manager import BlockManager
from minidu.scheduler.sequence import Sequence


def _seq(tokens):
    return Sequence("r", list(tokens), max_tokens=8)


def _compute_all(bm, seq):
    bm.append_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_prefix_hit_shares_blocks_and_skips_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _seq(range(10))
    bm.allocate_prefix(a)
    assert a.num_computed_tokens == 0
    _compute_all(bm, a)
    b = _seq([*range(8), 99, 98, 97])
    bm.allocate_prefix(b)
    assert b.num_computed_tokens == 8 and b.block_table == a.block_table[:2]
    assert all(bm.blocks[i].ref_count == 2 for i in b.block_table)


def test_full_prompt_hit_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _seq(range(8))
    bm.allocate_prefix(a)
    _compute_all(bm, a)
    b = _seq(range(8))
    bm.allocate_prefix(b)
    assert b.num_computed_tokens == 4  # the second block holds the last token, which must be recomputed


def test_freed_blocks_keep_hash_until_reused():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = _seq(range(9))
    bm.allocate_prefix(a)
    _compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 3
    b = _seq(range(9))
    bm.allocate_prefix(b)
    assert b.num_computed_tokens == 8
    bm.free(b)
    c = _seq([50 + i for i in range(12)])  # needs all three blocks: the cached ones are evicted
    bm.allocate_prefix(c)
    _compute_all(bm, c)
    d = _seq(range(9))
    bm.allocate_prefix(d)
    assert d.num_computed_tokens == 0


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _seq(range(9))
    bm.allocate_prefix(a)
    _compute_all(bm, a)
    b = _seq(range(9))
    bm.allocate_prefix(b)
    assert b.num_computed_tokens == 0


@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=20), min_size=1, max_size=6),
       st.integers(1, 5))
def test_ref_counts_match_tables_and_all_free_at_end(prompts, block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    seqs = []
    for tokens in prompts:
        s = _seq(tokens)
        bm.allocate_prefix(s)
        _compute_all(bm, s)
        seqs.append(s)
        refs = {}
        for q in seqs:
            for b in q.block_table:
                refs[b] = refs.get(b, 0) + 1
        assert all(bm.blocks[b].ref_count == n for b, n in refs.items())
        assert bm.num_free_blocks == 64 - len(refs)
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == 64 and all(b.ref_count == 0 for b in bm.blocks)
