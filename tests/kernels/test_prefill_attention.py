"""prefill_attention against a float64 reference that gathers each request's keys through its block table."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidu.kernels import tiles as tile_table
from minidu.kernels.prefill_attention import prefill_attention
from tests.conftest import DEVICE

# fp32 runs tl.dot in IEEE precision; fp16/bf16 round the softmax weights to the input dtype before the PV product.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@st.composite
def prefill_cases(draw, max_context: int = 64, max_new: int = 40):
    """Shapes of one batch: cached prefix and new-token counts per request (0 and 1 included), cache geometry."""
    num_seqs = draw(st.integers(1, 4))
    return dict(
        contexts=draw(st.lists(st.integers(0, max_context), min_size=num_seqs, max_size=num_seqs)),
        q_lens=draw(st.lists(st.sampled_from([0, 1, 2, 7, 16, 17, max_new]) | st.integers(0, max_new),
                             min_size=num_seqs, max_size=num_seqs)),
        block_size=draw(st.sampled_from([8, 16])),
        num_kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 4, 8])),
        head_dim=draw(st.sampled_from([64, 128, 80, 96])),
        extra_blocks=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_batch(case: dict, dtype: torch.dtype, device: torch.device = DEVICE) -> dict:
    """Random q and a paged cache with shuffled blocks. Every cache slot no request owns holds NaN and every unused
    block-table entry is -1, so reading either would poison the output."""
    gen = torch.Generator().manual_seed(case["seed"])
    bs, hk, d = case["block_size"], case["num_kv_heads"], case["head_dim"]
    seq_lens = [c + q for c, q in zip(case["contexts"], case["q_lens"])]
    blocks_per_seq = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq) + case["extra_blocks"]), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, bs, hk, d), float("nan"))
    v_cache = torch.full((num_blocks, bs, hk, d), float("nan"))
    used = 0
    for b, n in enumerate(seq_lens):
        block_tables[b, :blocks_per_seq[b]] = perm[used:used + blocks_per_seq[b]].to(torch.int32)
        used += blocks_per_seq[b]
        slots = torch.arange(n)
        blocks, offsets = block_tables[b, slots // bs].long(), slots % bs
        k_cache[blocks, offsets] = torch.randn(n, hk, d, generator=gen)
        v_cache[blocks, offsets] = torch.randn(n, hk, d, generator=gen)
    q_lens = torch.tensor(case["q_lens"], dtype=torch.int32)
    cu_seqlens_q = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu_seqlens_q[1:] = torch.cumsum(q_lens, 0)
    q = torch.randn(int(cu_seqlens_q[-1]), hk * case["group"], d, generator=gen)
    return dict(q=q.to(device, dtype), k_cache=k_cache.to(device, dtype), v_cache=v_cache.to(device, dtype),
                cu_seqlens_q=cu_seqlens_q.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
                block_tables=block_tables.to(device))


def reference(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale) -> torch.Tensor:
    """float64 causal attention; new token j of request b sits at position seq_len - q_len + j."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    q, k_cache, v_cache = q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double()
    group = q.shape[1] // k_cache.shape[2]
    bs = k_cache.shape[1]
    for b in range(seq_lens.shape[0]):
        start, end, n = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seq_lens[b])
        slots = torch.arange(n)
        blocks, offsets = block_tables[b, slots // bs].long().cpu(), slots % bs
        k = k_cache[blocks, offsets].repeat_interleave(group, 1)  # [n, Hq, D]
        v = v_cache[blocks, offsets].repeat_interleave(group, 1)
        scores = torch.einsum("thd,nhd->htn", q[start:end], k) * scale
        positions = n - (end - start) + torch.arange(end - start)
        scores = scores.masked_fill(slots[None, None, :] > positions[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("htn,nhd->thd", scores.softmax(-1), v)
    return out


def run(batch: dict, num_sms: int) -> torch.Tensor:
    out = torch.full_like(batch["q"], float("nan"))
    scale = batch["q"].shape[-1] ** -0.5
    result = prefill_attention(**batch, scale=scale, num_sms=num_sms, out=out)
    assert result is out
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@given(case=prefill_cases(), num_sms=st.integers(1, 48),
       score_elems=st.sampled_from([1024, tile_table.INTERPRET_SCORE_ELEMS]))
def test_matches_reference(dtype, case, num_sms, score_elems):
    """Interpreted, also with tiles small enough (1024 score elements: 1 to 16 tokens) that a request's new tokens
    span several q-blocks."""
    batch = build_batch(case, dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "INTERPRET_SCORE_ELEMS", score_elems)
        out = run(batch, num_sms)
    expected = reference(**batch, scale=batch["q"].shape[-1] ** -0.5)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol)


@settings(max_examples=4)
@given(case=prefill_cases(), num_sms=st.integers(2, 48))
def test_bitwise_independent_of_num_sms(case, num_sms):
    batch = build_batch(case, torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tile_table, "INTERPRET_SCORE_ELEMS", 1024)  # many tiles for the budget to spread
        assert torch.equal(run(batch, 1), run(batch, num_sms))


@pytest.mark.parametrize("head_dim", [48, 80])
def test_single_token_without_prefix_copies_its_value(head_dim):
    case = dict(contexts=[0, 0], q_lens=[1, 1], block_size=16, num_kv_heads=2, group=3, head_dim=head_dim,
                extra_blocks=1, seed=7)
    batch = build_batch(case, torch.float32)
    out = run(batch, 4)
    for b in range(2):
        block = int(batch["block_tables"][b, 0])
        expected = batch["v_cache"][block, 0].repeat_interleave(3, 0)
        assert torch.equal(out[b], expected)


def test_no_new_tokens_leaves_out_untouched():
    case = dict(contexts=[5, 20], q_lens=[0, 0], block_size=16, num_kv_heads=1, group=2, head_dim=64,
                extra_blocks=0, seed=1)
    batch = build_batch(case, torch.float32)
    assert batch["q"].shape[0] == 0
    assert run(batch, 3).shape == (0, 2, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tl.dot on bf16 is only exact on a GPU")
@given(case=prefill_cases(), num_sms=st.integers(1, 200))
def test_bfloat16_on_cuda(case, num_sms):
    batch = build_batch(case, torch.bfloat16, "cuda")
    out = run(batch, num_sms)
    expected = reference(**batch, scale=batch["q"].shape[-1] ** -0.5)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol)


def _valid_batch() -> dict:
    case = dict(contexts=[3, 9], q_lens=[2, 4], block_size=8, num_kv_heads=2, group=2, head_dim=64,
                extra_blocks=0, seed=3)
    return build_batch(case, torch.float32)


BAD_INPUTS = [
    ("q", lambda b: b.update(q=b["q"].to(torch.int32))),
    ("q", lambda b: b.update(q=b["q"].flatten(1))),
    ("k_cache", lambda b: b.update(k_cache=b["k_cache"].half())),
    ("v_cache", lambda b: b.update(v_cache=b["v_cache"][..., :32])),
    ("head_dim", lambda b: b.update(k_cache=b["k_cache"][..., :32], v_cache=b["v_cache"][..., :32])),
    ("multiple", lambda b: b.update(q=b["q"][:, :3])),
    ("cu_seqlens_q", lambda b: b.update(cu_seqlens_q=b["cu_seqlens_q"][:-1])),
    ("cu_seqlens_q", lambda b: b.update(cu_seqlens_q=b["cu_seqlens_q"].float())),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"][None])),
    ("block_tables", lambda b: b.update(block_tables=b["block_tables"][:1])),
    ("block_tables", lambda b: b.update(block_tables=b["block_tables"].flatten())),
]


@pytest.mark.parametrize("name,corrupt", BAD_INPUTS)
def test_bad_inputs_raise(name, corrupt):
    batch = _valid_batch()
    corrupt(batch)
    with pytest.raises(ValueError, match=name):
        prefill_attention(**batch, scale=0.125)


def test_bad_out_and_num_sms_raise():
    batch = _valid_batch()
    with pytest.raises(ValueError, match="out"):
        prefill_attention(**batch, scale=0.125, out=torch.empty_like(batch["q"]).half())
    with pytest.raises(ValueError, match="num_sms"):
        prefill_attention(**batch, scale=0.125, num_sms=0)
