"""Tests for the sampling kernel: greedy, top-k and top-p sets and the sampled distribution against float64 PyTorch
references, and reproducibility of seeded draws across batches, steps, SM budgets and logits dtypes."""
import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

from minidu.kernels import sampling
from minidu.kernels import tiles as tile_table
from tests.conftest import to_device

DTYPES = [torch.float32, torch.float16]


def sample(logits, out=None, **kwargs):
    """The kernel on DEVICE, given and giving CPU tensors (these tests build and check everything on the CPU); on a
    CPU DEVICE it is the kernel itself, `out` included."""
    args = {k: to_device(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    device_out = None if out is None else to_device(out)
    result = sampling.sample(to_device(logits) if isinstance(logits, torch.Tensor) else logits, out=device_out, **args)
    if out is not None and result is device_out and device_out is not out:
        return out.copy_(result)
    return result.cpu()
# Logits on a grid of quarters in [-4, 4]: exact in fp16 and bf16, with frequent ties, and distinct values stay distinct
# after division by any temperature used here.
GRID = st.integers(-16, 16).map(lambda v: v / 4)


def _params(batch: int, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, step=0) -> dict[str, torch.Tensor]:
    """The per-request tensors of sample(); a scalar is repeated over the batch, a sequence used as given."""
    def vec(value, dtype):
        t = torch.as_tensor(value, dtype=dtype)
        return t.expand(batch).contiguous() if t.dim() == 0 else t.contiguous()

    return dict(temperatures=vec(temperature, torch.float32), top_ks=vec(top_k, torch.int32),
                top_ps=vec(top_p, torch.float32), seeds=vec(seed, torch.int64), steps=vec(step, torch.int64))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Smallest highest-probability set reaching mass top_p (all tokens tied at the cut kept), by sort and cumsum."""
    sorted_probs = torch.sort(probs, descending=True).values
    mass_ahead = torch.cumsum(sorted_probs, 0) - sorted_probs
    cutoff = sorted_probs[mass_ahead < top_p].min()
    return probs >= cutoff


def reference_probs(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Float64 softmax(row / temperature) restricted to top-k, then to the top-p nucleus, renormalised."""
    z = row.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < z.numel():
        keep = z >= torch.sort(z, descending=True).values[top_k - 1]
    if top_p < 1.0:
        keep &= _nucleus(torch.softmax(z.masked_fill(~keep, -math.inf), 0), top_p)
    return torch.softmax(z.masked_fill(~keep, -math.inf), 0)


def nucleus_margin(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> float:
    """Distance of top_p from every cumulative mass of the top-k set: fp32 sums may cut differently when it is tiny."""
    z = row.double() / temperature
    if 0 < top_k < z.numel():
        z = z.masked_fill(z < torch.sort(z, descending=True).values[top_k - 1], -math.inf)
    cumulative = torch.cumsum(torch.sort(torch.softmax(z, 0), descending=True).values, 0)
    return float((cumulative - top_p).abs().min())


@st.composite
def batches(draw, max_batch=5, max_vocab=24, vocab=None):
    """(logits fp32 [B, V] on GRID, per-row (temperature, top_k, top_p)) with top_p away from fp32 rounding cuts."""
    batch, vocab = draw(st.integers(1, max_batch)), vocab or draw(st.integers(2, max_vocab))
    logits = torch.tensor(draw(st.lists(GRID, min_size=batch * vocab, max_size=batch * vocab))).view(batch, vocab)
    rows = []
    for b in range(batch):
        temperature = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.9]))
        top_k = draw(st.integers(-1, vocab + 1))
        top_p = draw(st.one_of(st.just(1.0), st.floats(0.05, 0.99)))
        if temperature > 0 and top_p < 1:
            assume(nucleus_margin(logits[b], temperature, top_k, top_p) > 1e-4)
        rows.append((temperature, top_k, top_p))
    return logits, rows


def _replicate(logits, rows, copies, seed0):
    """Each row `copies` times with distinct seeds, as one batch."""
    logits = logits.repeat_interleave(copies, 0)
    expanded = [r for r in rows for _ in range(copies)]
    params = _params(len(expanded), temperature=[r[0] for r in expanded], top_k=[r[1] for r in expanded],
                     top_p=[r[2] for r in expanded], seed=seed0 + torch.arange(len(expanded)), step=7)
    return logits, expanded, params


@given(batches(), st.sampled_from(DTYPES), st.integers(0, 2**62))
def test_tokens_lie_in_reference_set(case, dtype, seed0):
    logits, rows = case
    logits, expanded, params = _replicate(logits, rows, 32, seed0)
    logits = logits.to(dtype)
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64)
    tokens = sample(logits, **params, out=out)
    assert tokens is out and bool(((out >= 0) & (out < logits.shape[1])).all()), "every row must be written"
    for row, (temperature, top_k, top_p), token in zip(logits, expanded, tokens.tolist()):
        if temperature == 0:
            assert token == int(torch.argmax(row.float()))
        else:
            assert reference_probs(row.float(), temperature, top_k, top_p)[token] > 0


@given(st.integers(1, 6), st.integers(1, 40), st.data())
def test_greedy_is_first_argmax(batch, vocab, data):
    values = data.draw(st.lists(st.integers(-2, 2), min_size=batch * vocab, max_size=batch * vocab))
    logits = torch.tensor(values, dtype=torch.float32).view(batch, vocab)
    # top_k / top_p must not matter to greedy rows.
    params = _params(batch, temperature=0.0, top_k=data.draw(st.integers(-1, vocab)), top_p=0.3, seed=5)
    assert torch.equal(sample(logits, **params), torch.argmax(logits, dim=1))


@given(st.integers(1, 6), st.integers(2, 40), st.floats(0.05, 5.0), st.data())
def test_top_k_one_or_tiny_top_p_gives_the_maximum(batch, vocab, temperature, data):
    values = data.draw(st.lists(GRID, min_size=batch * vocab, max_size=batch * vocab))
    logits = torch.tensor(values).view(batch, vocab)
    top_k, top_p = data.draw(st.sampled_from([(1, 1.0), (0, 1e-6), (1, 0.5)]))
    tokens = sample(logits, **_params(batch, temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=torch.arange(batch) * 977))
    assert torch.equal(logits.gather(1, tokens[:, None])[:, 0], logits.max(dim=1).values)
    distinct = (logits == logits.max(dim=1, keepdim=True).values).sum(1) == 1
    assert torch.equal(tokens[distinct], torch.argmax(logits, dim=1)[distinct])


def _chi_square_bound(df: int, z: float = 4.5) -> float:
    """Upper quantile of chi-square(df) at standard-normal level z (Wilson-Hilferty); z=4.5 is a 3.4e-6 tail."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


STAT_LOGITS = [1.0, 0.5, -0.3, 2.0, 0.1, -1.0, 1.2, 0.0]


@pytest.mark.parametrize("temperature,top_k,top_p,vary", [
    (1.0, 0, 1.0, "seeds"), (0.7, 5, 1.0, "seeds"), (1.5, 0, 0.8, "seeds"), (0.8, 6, 0.75, "seeds"),
    (1.0, 6, 0.9, "steps"),
])
def test_distribution_matches_reference(temperature, top_k, top_p, vary):
    """2000 draws of one V=8 row (distinct seeds, or one seed over distinct steps) against the float64 reference."""
    draws, row = 2000, torch.tensor(STAT_LOGITS)
    assert top_p == 1.0 or nucleus_margin(row, temperature, top_k, top_p) > 1e-3
    indices = torch.arange(draws)
    seed, step = (indices + 12345, 3) if vary == "seeds" else (99, indices)
    tokens = sample(row.expand(draws, -1).contiguous(),
                    **_params(draws, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, step=step))
    counts = torch.bincount(tokens, minlength=len(STAT_LOGITS)).double()
    expected = reference_probs(row, temperature, top_k, top_p) * draws
    kept = expected > 0
    assert counts[~kept].sum() == 0, "tokens outside the top-k / top-p set were drawn"
    chi_square = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    assert chi_square < _chi_square_bound(int(kept.sum()) - 1), (chi_square, counts.tolist(), expected.tolist())


@given(batches(max_batch=6), st.data())
def test_seeded_draw_ignores_batch_composition_and_num_sms(case, data):
    logits, rows = case
    batch = logits.shape[0]
    seeds = torch.tensor(data.draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=batch, max_size=batch)))
    steps = torch.tensor(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=batch, max_size=batch)))
    params = _params(batch, temperature=[r[0] for r in rows], top_k=[r[1] for r in rows],
                     top_p=[r[2] for r in rows], seed=seeds, step=steps)
    tokens = sample(logits, **params)
    # The same requests shuffled, twice over (duplicates must agree), between fresh neighbours.
    order = torch.tensor(data.draw(st.permutations(list(range(batch)))) * 2)
    extra, extra_rows = data.draw(batches(max_batch=3, vocab=logits.shape[1]))
    mixed_logits = torch.cat([extra[:1], logits[order], extra[1:]])
    extra_params = _params(len(extra_rows), temperature=[r[0] for r in extra_rows],
                           top_k=[r[1] for r in extra_rows], top_p=[r[2] for r in extra_rows], seed=3, step=4)
    mixed = {k: torch.cat([extra_params[k][:1], v[order], extra_params[k][1:]]) for k, v in params.items()}
    again = sample(mixed_logits, **mixed, num_sms=data.draw(st.integers(1, 4)))
    assert torch.equal(again[1:1 + len(order)], tokens[order])


def test_bitwise_equal_across_num_sms():
    torch.manual_seed(0)
    batch, vocab = 80, 100  # several row tiles in the interpreter, one row per tile on CUDA
    logits = torch.randn(batch, vocab) * 3
    params = _params(batch, temperature=torch.tensor([0.0, 0.6, 1.0, 1.4]).repeat(20),
                     top_k=torch.tensor([0, 1, 20, 99, 100]).repeat(16),
                     top_p=torch.tensor([1.0, 0.9, 0.5, 0.99]).repeat(20),
                     seed=torch.arange(batch) * 31, step=torch.arange(batch) % 3)
    reference = sample(logits, **params, num_sms=1)
    for num_sms in (2, 3, None):
        assert torch.equal(sample(logits, **params, num_sms=num_sms), reference)


def test_steps_and_seeds_give_different_streams():
    """Uniform logits over 16 tokens: 64 steps of one request must look like a fresh stream per step and per seed."""
    draws, vocab = 64, 16
    logits = torch.zeros(draws, vocab)
    steps = torch.arange(draws)
    stream = sample(logits, **_params(draws, seed=11, step=steps))
    assert len(set(stream.tolist())) >= 8, stream
    for other in (sample(logits, **_params(draws, seed=11, step=steps + draws)),
                  sample(logits, **_params(draws, seed=12, step=steps)),
                  sample(logits, **_params(draws, seed=steps, step=11))):  # seed and step must not commute
        assert not torch.equal(other, stream)
    assert torch.equal(sample(logits, **_params(draws, seed=11, step=steps)), stream)


def test_fp16_matches_fp32_on_exact_values():
    torch.manual_seed(1)
    logits = (torch.randint(-16, 17, (24, 50)) / 4).float()
    params = _params(24, temperature=torch.tensor([0.0, 0.5, 1.0]).repeat(8), top_k=torch.tensor([0, 5]).repeat(12),
                     top_p=torch.tensor([1.0, 1.0, 0.7, 0.95]).repeat(6), seed=torch.arange(24))
    assert torch.equal(sample(logits.half(), **params), sample(logits, **params))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 runs compiled on CUDA only")
def test_bf16_matches_fp32_on_exact_values():
    logits = (torch.randint(-16, 17, (64, 1000), device="cuda") / 4).float()
    params = {k: v.cuda() for k, v in _params(64, temperature=torch.tensor([0.0, 0.8]).repeat(32), top_k=50,
                                               top_p=0.9, seed=torch.arange(64)).items()}
    assert torch.equal(sample(logits.bfloat16(), **params), sample(logits, **params))


@pytest.mark.parametrize("scan_elems", [4096, tile_table.INTERPRET_SCAN_ELEMS])
def test_large_vocab_spans_several_chunks(scan_elems, monkeypatch):
    """V beyond one vocab chunk: tied maxima (within and across chunks) resolve to the lowest index, sampled tokens
    lie in the reference set. Interpreted, the maxima passes scan V = 2500 in one chunk, or in two with 4096
    elements a chunk (2 rows of 2048)."""
    monkeypatch.setattr(tile_table, "INTERPRET_SCAN_ELEMS", scan_elems)
    vocab = 2500
    torch.manual_seed(2)
    logits = (torch.randint(-16, 13, (4, vocab)) / 4).float()
    logits[0, 2100] = logits[0, 2300] = 5.0
    logits[1, 7] = logits[1, 7 + 2048] = 5.0  # one lane, two chunks apart (chunks of 2048 interpreted, 512 on CUDA)
    rows = [(0.0, 0, 1.0), (0.0, 0, 1.0), (0.8, 40, 1.0), (1.3, 0, 0.6)]
    assert nucleus_margin(logits[3], 1.3, 0, 0.6) > 1e-4
    logits, expanded, params = _replicate(logits, rows, 2, 100)
    tokens = sample(logits, **params).tolist()
    assert tokens[:4] == [2100, 2100, 7, 7]
    for row, (temperature, top_k, top_p), token in zip(logits[4:], expanded[4:], tokens[4:]):
        assert reference_probs(row, temperature, top_k, top_p)[token] > 0


def test_strided_rows_nan_and_masked_logits():
    torch.manual_seed(3)
    base = torch.randn(6, 40) * 2
    base[:, 3] = float("nan")
    base[:, 5] = float("-inf")
    base[0, :] = float("-inf")
    base[0, 9] = 1.0
    base[5, :] = float("-inf")
    logits = base[:, 2:34]  # row stride 40, not 32
    params = _params(6, temperature=[1.0, 0.0, 1.0, 2.0, 5.0, 1.0], top_k=[0, 0, 0, 3, 0, 0],
                     top_p=[1.0, 1.0, 1.0, 1.0, 0.9, 0.5], seed=torch.arange(6))
    tokens = sample(logits, **params)
    assert torch.equal(tokens, sample(logits.contiguous(), **params))
    assert tokens[0] == 7 and not bool(((tokens[:5] == 1) | (tokens[:5] == 3)).any())
    assert tokens[1] == int(torch.argmax(torch.nan_to_num(logits[1], nan=-math.inf)))
    assert 0 <= int(tokens[5]) < logits.shape[1], "a row of -inf logits still gets a valid index"


def test_empty_batch():
    assert sample(torch.zeros(0, 10), **_params(0)).shape == (0,)


def _valid():
    return dict(logits=torch.zeros(3, 10), **_params(3))


@pytest.mark.parametrize("name,value", [
    ("logits", torch.zeros(3, 10, dtype=torch.int32)),
    ("logits", torch.zeros(30)),
    ("logits", torch.zeros(3, 0)),
    ("logits", torch.zeros(10, 3).t()),
    ("temperatures", torch.zeros(3, dtype=torch.float64)),
    ("temperatures", torch.zeros(4)),
    ("temperatures", torch.tensor([1.0, -0.5, 1.0])),
    ("temperatures", torch.tensor([1.0, math.nan, 1.0])),
    ("top_ks", torch.zeros(3, dtype=torch.int64)),
    ("top_ps", torch.tensor([1.0, 0.0, 1.0])),
    ("top_ps", torch.tensor([1.0, 1.5, 1.0])),
    ("seeds", torch.zeros(3, dtype=torch.int32)),
    ("steps", torch.zeros(3, 1, dtype=torch.int64)),
    ("out", torch.zeros(3, dtype=torch.int32)),
    ("out", torch.zeros(4, dtype=torch.int64)),
    ("num_sms", 0),
])
def test_bad_input_raises_value_error_naming_it(name, value):
    kwargs = _valid()
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        sample(**kwargs)
