"""decode_attention (split-KV with a log-sum-exp merge) against a float64 reference over the paged cache, through the
compiled kernels' path and the interpreter's own paths, in one split or many."""
import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidu.kernels import decode_attention as decode_module
from minidu.kernels.decode_attention import decode_attention, decode_workspace
from minidu.kernels import tiles as tile_table
from minidu.kernels.tiles import DecodeTiles, decode_tiles
from tests.conftest import DEVICE

# fp32 runs tl.dot in IEEE precision; fp16/bf16 round the softmax weights to the input dtype before the PV product.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Interpreter tiles: its own (one split holds every test context), splits of 32 keys in 16-key steps (test contexts
# span several splits, the merge, and several steps a split), or splits of one 16-key step each.
ONE_SPLIT = tile_table.INTERPRET_DECODE_TILES
SMALL_SPLITS = DecodeTiles(block_n=16, partition_size=32, num_warps=4)
ONE_STEP_SPLITS = DecodeTiles(block_n=16, partition_size=16, num_warps=4)


@contextlib.contextmanager
def kernel_config(interpreter_paths: bool, tiles: DecodeTiles):
    """The interpreter's own kernel paths on or off (off: the compiled kernels' path) and its tiles (no effect on the
    tiles of compiled kernels)."""
    with (mock.patch.object(decode_module, "INTERPRET_PATHS", interpreter_paths),
          mock.patch.object(tile_table, "INTERPRET_DECODE_TILES", tiles)):
        yield


@st.composite
def decode_cases(draw, max_len: int = 100):
    """Shapes of one decode batch: seq_lens (0 = CUDA-graph padding row, 1, block boundaries), cache geometry."""
    num_seqs = draw(st.integers(1, 4))
    return dict(
        seq_lens=draw(st.lists(st.sampled_from([0, 1, 16, 17, 32, 65, max_len]) | st.integers(0, max_len),
                               min_size=num_seqs, max_size=num_seqs)),
        block_size=draw(st.sampled_from([8, 16, 32])),
        num_kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 4, 8])),
        head_dim=draw(st.sampled_from([64, 128, 80, 96])),
        extra_blocks=draw(st.integers(0, 4)),
        strided_v=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_batch(case: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Random q and a paged cache with shuffled blocks. Every cache slot no request owns holds NaN and every unused
    block-table entry is -1, so reading either would poison the output. `strided_v`: v_cache is a view into wider
    rows (NaN beyond head_dim), so its strides differ from k_cache's."""
    gen = torch.Generator().manual_seed(case["seed"])
    bs, hk, d = case["block_size"], case["num_kv_heads"], case["head_dim"]
    seq_lens = case["seq_lens"]
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
    q = torch.randn(len(seq_lens), hk * case["group"], d, generator=gen)
    v_cache = v_cache.to(device, dtype)
    if case.get("strided_v"):
        wide = torch.full((*v_cache.shape[:-1], d + 16), float("nan"), dtype=dtype, device=device)
        wide[..., :d] = v_cache
        v_cache = wide[..., :d]
    return dict(q=q.to(device, dtype), k_cache=k_cache.to(device, dtype), v_cache=v_cache,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device), block_tables=block_tables.to(device))


def reference(q, k_cache, v_cache, seq_lens, block_tables, scale) -> torch.Tensor:
    """float64 attention of each request's query over its keys 0..seq_len-1; zeros for seq_len 0."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    q, k_cache, v_cache = q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double()
    group = q.shape[1] // k_cache.shape[2]
    bs = k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        if n == 0:
            continue
        slots = torch.arange(n)
        blocks, offsets = block_tables[b, slots // bs].long().cpu(), slots % bs
        k = k_cache[blocks, offsets].repeat_interleave(group, 1)  # [n, Hq, D]
        v = v_cache[blocks, offsets].repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[b], k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


def run(batch: dict, num_sms: int, **kwargs) -> torch.Tensor:
    out = torch.full_like(batch["q"], float("nan"))
    scale = batch["q"].shape[-1] ** -0.5
    result = decode_attention(**batch, scale=scale, num_sms=num_sms, out=out, **kwargs)
    assert result is out
    return out


@pytest.mark.parametrize("interpreter_paths", [True, False], ids=["interpreter-paths", "compiled-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@given(case=decode_cases(), num_sms=st.integers(1, 64),
       tiles=st.sampled_from([ONE_SPLIT, SMALL_SPLITS, ONE_STEP_SPLITS]))
def test_matches_reference(dtype, interpreter_paths, case, num_sms, tiles, device):
    batch = build_batch(case, dtype, device)
    with kernel_config(interpreter_paths, tiles):
        out = run(batch, num_sms)
    expected = reference(**batch, scale=batch["q"].shape[-1] ** -0.5)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@settings(max_examples=4)
@given(case=decode_cases(), num_sms=st.integers(2, 64), interpreter_paths=st.booleans())
def test_bitwise_independent_of_num_sms_and_workspace(case, num_sms, interpreter_paths, device):
    batch = build_batch(case, torch.float32, device)
    with kernel_config(interpreter_paths, SMALL_SPLITS):
        workspace = decode_workspace(batch["q"], batch["k_cache"], batch["block_tables"])
        workspace[0].fill_(float("nan"))
        workspace[1].fill_(float("nan"))
        assert torch.equal(run(batch, 1), run(batch, num_sms, workspace=workspace))


@pytest.mark.parametrize("interpreter_paths", [True, False], ids=["interpreter-paths", "compiled-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", [SMALL_SPLITS, ONE_SPLIT], ids=["small-splits", "one-split"])
def test_request_output_independent_of_batch_and_table_width(dtype, interpreter_paths, tiles, device):
    """A request's output is bitwise the same alone (narrowest table) and beside a longer request with a wide table,
    so graph steps (tables as wide as max_model_len) and eager steps give the same tokens. In one split the first
    request fits one step: alone it runs the interpreter's ONE_STEP path, beside the other the online softmax."""
    with kernel_config(interpreter_paths, tiles):
        split, step = decode_tiles().partition_size, decode_tiles().block_n
        seq_lens = [split + 5, 4 * split + 3] if split < 4 * step else [step - 3, 3 * step + 1]
        case = dict(seq_lens=seq_lens, block_size=16, num_kv_heads=2, group=2, head_dim=64, extra_blocks=7, seed=9)
        batch = build_batch(case, dtype, device)
        both = run(batch, 3)
        width = -(-case["seq_lens"][0] // 16)
        alone = dict(batch, q=batch["q"][:1], seq_lens=batch["seq_lens"][:1],
                     block_tables=batch["block_tables"][:1, :width])
        assert torch.equal(run(alone, 2)[0], both[0])


def test_padding_rows_give_zeros(device):
    case = dict(seq_lens=[0, 40, 0], block_size=16, num_kv_heads=2, group=4, head_dim=64, extra_blocks=2, seed=5)
    batch = build_batch(case, torch.float16, device)
    out = run(batch, 5)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("head_dim", [48, 80])
def test_single_key_copies_its_value(head_dim, device):
    case = dict(seq_lens=[1, 1], block_size=8, num_kv_heads=2, group=3, head_dim=head_dim, extra_blocks=3, seed=2)
    batch = build_batch(case, torch.float32, device)
    out = run(batch, 3)
    for b in range(2):
        expected = batch["v_cache"][int(batch["block_tables"][b, 0]), 0].repeat_interleave(3, 0)
        assert torch.equal(out[b], expected)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="tl.dot on bf16 is only exact on a GPU")
@given(case=decode_cases(max_len=2000), num_sms=st.integers(1, 200))
def test_bfloat16_on_cuda(case, num_sms):
    batch = build_batch(case, torch.bfloat16, DEVICE)
    out = run(batch, num_sms)
    expected = reference(**batch, scale=batch["q"].shape[-1] ** -0.5)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol)


def _valid_batch() -> dict:
    case = dict(seq_lens=[3, 9], block_size=8, num_kv_heads=2, group=2, head_dim=64, extra_blocks=0, seed=3)
    return build_batch(case, torch.float32, DEVICE)


BAD_INPUTS = [
    ("q", lambda b: b.update(q=b["q"].to(torch.int32))),
    ("q", lambda b: b.update(q=b["q"].flatten(1))),
    ("k_cache", lambda b: b.update(k_cache=b["k_cache"].half())),
    ("v_cache", lambda b: b.update(v_cache=b["v_cache"][..., :32])),
    ("head_dim", lambda b: b.update(k_cache=b["k_cache"][..., :32], v_cache=b["v_cache"][..., :32])),
    ("multiple", lambda b: b.update(q=b["q"][:, :3])),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"][:1])),
    ("seq_lens", lambda b: b.update(seq_lens=b["seq_lens"].float())),
    ("block_tables", lambda b: b.update(block_tables=b["block_tables"][:1])),
    ("block_tables", lambda b: b.update(block_tables=b["block_tables"].flatten())),
]


@pytest.mark.parametrize("name,corrupt", BAD_INPUTS)
def test_bad_inputs_raise(name, corrupt):
    batch = _valid_batch()
    corrupt(batch)
    with pytest.raises(ValueError, match=name):
        decode_attention(**batch, scale=0.125)


def test_bad_out_workspace_and_num_sms_raise():
    batch = _valid_batch()
    with pytest.raises(ValueError, match="out"):
        decode_attention(**batch, scale=0.125, out=torch.empty_like(batch["q"])[:1])
    with pytest.raises(ValueError, match="num_sms"):
        decode_attention(**batch, scale=0.125, num_sms=0)
    partial_out, partial_lse = decode_workspace(batch["q"], batch["k_cache"], batch["block_tables"])
    with pytest.raises(ValueError, match="workspace"):
        decode_attention(**batch, scale=0.125, workspace=(partial_out[:, :, :, :8], partial_lse))
    with pytest.raises(ValueError, match="workspace"):
        decode_attention(**batch, scale=0.125, workspace=partial_out)
