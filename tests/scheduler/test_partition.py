"""choose_partition: invariants of the decision, optimality against brute force, truncation and fallbacks."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidu.scheduler.hardware import load_profile
from minidu.scheduler.partition import choose_partition, default_decode_sms_choices
from minidu.scheduler.roofline import LatencyModel, ModelShape

QWEN3_8B = ModelShape(num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=12288, vocab_size=151936, qk_norm=True)
MODEL = LatencyModel(QWEN3_8B, load_profile("h200"))
S = 132


def aggregated_throughput(decode, chunks) -> float:
    requests = [(1, c) for c in decode] + chunks
    return sum(q for q, _ in requests) / MODEL.step_time(requests, S)


def decode_budgets(step: int) -> tuple[int, ...]:
    return tuple(range(step, S - step + 1, step))


def side_by_side(decode, prefill, s_d) -> tuple[float, float]:
    """(t_p, t_d) of a prefill batch on S - s_d SMs beside one decode step on s_d SMs."""
    return MODEL.multiplexed_times(MODEL.work(prefill), S - s_d, MODEL.work([(1, c) for c in decode]), s_d)


def decode_bound(decode, s_d) -> float:
    """The decode step beside prefill before bandwidth sharing: the optimizer's feasibility test."""
    return MODEL.decode_time(decode, s_d) * (1 + MODEL.hw.corun_decode_slowdown)


def check_decision(d, decode, chunks, tau, granularity, max_k):
    """Invariants every decision satisfies, recomputed from the latency model."""
    assert d.num_sms == S
    if d.split is None:
        t = MODEL.step_time([(1, c) for c in decode] + chunks, S)
        assert d.decode_step_time == d.prefill_time == d.predicted_time
        assert d.predicted_time == pytest.approx(t, rel=1e-12)
        assert d.meets_tbt == (t <= tau)
        return
    assert d.split.num_sms_decode in decode_budgets(granularity) and 1 <= d.split.k <= max_k
    assert d.split.num_sms_prefill == S - d.split.num_sms_decode
    n, last = d.split.num_prefill_chunks, d.split.last_chunk_tokens
    assert 1 <= n <= len(chunks) and 1 <= last <= chunks[n - 1][0]
    t_p, t_d = side_by_side(decode, chunks[:n - 1] + [(last, chunks[n - 1][1])], d.split.num_sms_decode)
    assert d.decode_step_time == pytest.approx(t_d, rel=1e-12)
    assert d.prefill_time == pytest.approx(t_p, rel=1e-12)
    period = max(d.split.k * t_d, t_p) + MODEL.hw.period_overhead
    assert d.predicted_time == pytest.approx(period, rel=1e-12)
    tokens = d.split.k * len(decode) + sum(q for q, _ in chunks[:n - 1]) + last
    assert d.predicted_throughput == pytest.approx(tokens / period, rel=1e-12)
    assert d.split.k in (min(max_k, max(1, math.floor(t_p / t_d))), min(max_k, math.ceil(t_p / t_d)))
    if d.meets_tbt:  # decode steps within tau that cover the prefill: the next step's first token is tau away at most
        assert t_d <= tau and d.split.k * t_d >= t_p * (1 - 1e-12)


def brute_force_best(decode, chunks, tau, granularity, max_k) -> float:
    """Best multiplexed throughput over every decode budget, full FCFS prefix and k, honouring tau: decode steps of
    at most tau that cover the prefill (k * t_d >= t_p), so no decode waits at the end of the period."""
    best = 0.0
    for s_d in decode_budgets(granularity):
        if decode_bound(decode, s_d) > tau:
            continue
        for n in range(1, len(chunks) + 1):
            t_p, t_d = side_by_side(decode, chunks[:n], s_d)
            for k in range(1, max_k + 1):
                if k * t_d >= t_p and t_d <= tau:
                    tokens = k * len(decode) + sum(q for q, _ in chunks[:n])
                    best = max(best, tokens / (max(k * t_d, t_p) + MODEL.hw.period_overhead))
    return best


decode_st = st.lists(st.integers(0, 32768), min_size=0, max_size=48)
chunks_st = st.lists(st.tuples(st.integers(1, 8192), st.integers(0, 8192)), min_size=0, max_size=4)


@given(decode=decode_st, chunks=chunks_st, tau=st.floats(1e-3, 0.2), step=st.sampled_from([1, 4, 16]),
       max_k=st.integers(1, 16), prefer_tbt=st.booleans())
def test_decisions_are_consistent_with_the_latency_model(decode, chunks, tau, step, max_k, prefer_tbt):
    d = choose_partition(decode, chunks, tau, MODEL, decode_sms_choices=decode_budgets(step), max_k=max_k,
                         prefer_tbt=prefer_tbt)
    check_decision(d, decode, chunks, tau, step, max_k)
    feasible = any(decode_bound(decode, s) <= tau for s in decode_budgets(step))
    if d.split is not None and feasible:
        assert d.meets_tbt
    if not prefer_tbt and decode:
        assert d.predicted_throughput >= aggregated_throughput(decode, chunks) * (1 - 1e-12)


@given(decode=st.lists(st.integers(1024, 8192), min_size=16, max_size=96),
       chunks=st.lists(st.tuples(st.integers(256, 4096), st.integers(0, 4096)), min_size=1, max_size=3),
       tau_scale=st.floats(0.3, 0.95), max_k=st.integers(2, 16))
def test_multiplexing_regime(decode, chunks, tau_scale, max_k):
    # tau between the decode-only step and the aggregated step: aggregated breaks it, some partitions meet it.
    t_decode = MODEL.decode_time(decode, S)
    t_agg = MODEL.step_time([(1, c) for c in decode] + chunks, S)
    tau = t_decode + tau_scale * (t_agg - t_decode)
    d = choose_partition(decode, chunks, tau, MODEL, max_k=max_k)
    check_decision(d, decode, chunks, tau, 16, max_k)
    assert d.predicted_throughput >= aggregated_throughput(decode, chunks) * (1 - 1e-12)
    # At least as good as every untruncated plan that meets tau; multiplexed plans meet tau.
    best = brute_force_best(decode, chunks, tau, 16, max_k)
    assert d.predicted_throughput >= best * (1 - 1e-12)
    assert d.split is None or d.meets_tbt
    tbt_first = choose_partition(decode, chunks, tau, MODEL, max_k=max_k, prefer_tbt=True)
    check_decision(tbt_first, decode, chunks, tau, 16, max_k)
    if best > 0:
        assert tbt_first.split is not None and tbt_first.meets_tbt
        assert tbt_first.predicted_throughput >= best * (1 - 1e-12)


def test_optimizer_matches_brute_force_when_it_multiplexes():
    decode, chunks, tau = [4096] * 64, [(2048, 0)], 0.03
    d = choose_partition(decode, chunks, tau, MODEL, prefer_tbt=True)
    assert d.split is not None and d.meets_tbt
    assert d.predicted_throughput == pytest.approx(brute_force_best(decode, chunks, tau, 16, 8), rel=1e-12)
    check_decision(d, decode, chunks, tau, 16, 8)


def test_long_chunk_is_truncated_to_fit_the_tbt_window():
    decode, chunks, tau, max_k = [4096] * 64, [(16384, 0), (512, 0)], 0.03, 4
    d = choose_partition(decode, chunks, tau, MODEL, max_k=max_k, prefer_tbt=True)
    check_decision(d, decode, chunks, tau, 16, max_k)
    assert d.split is not None and d.meets_tbt
    assert d.split.num_prefill_chunks == 1 and d.split.last_chunk_tokens < 16384
    # The next truncation level (1/64 of the chunk longer) would overrun the window of max_k decode steps.
    longer = d.split.last_chunk_tokens + 16384 // 64
    t_longer = MODEL.step_time([(longer, 0)], d.split.num_sms_prefill)
    assert t_longer > max_k * d.decode_step_time


def test_aggregated_when_it_meets_tau_or_nothing_to_separate():
    decode, chunks = [4096] * 64, [(2048, 0)]
    t_agg = MODEL.step_time([(1, c) for c in decode] + chunks, S)
    for args in ((decode, chunks, t_agg), (decode, [], 1e-4), ([], chunks, 1e-4), ([], [], 1e-4)):
        d = choose_partition(*args, MODEL)
        assert d.split is None
        check_decision(d, *args, 16, 8)
    assert choose_partition([], [], 1e-3, MODEL).predicted_throughput == 0.0


def test_unreachable_tau_uses_the_fastest_decode_budget():
    decode, chunks = [8192] * 96, [(8192, 0)]
    tau = 0.5 * MODEL.decode_time(decode, S)  # no budget meets it
    d = choose_partition(decode, chunks, tau, MODEL)
    check_decision(d, decode, chunks, tau, 16, 8)
    assert not d.meets_tbt
    if d.split is not None:
        fastest = min(MODEL.decode_time(decode, s) for s in decode_budgets(16))
        assert d.decode_step_time == fastest


def test_search_stays_small():
    class CountingModel(LatencyModel):
        works = times = 0

        def work(self, requests):
            CountingModel.works += 1
            return super().work(requests)

        def time(self, work, num_sms, bandwidth_share=1.0):
            CountingModel.times += 1
            return super().time(work, num_sms, bandwidth_share)

    model = CountingModel(QWEN3_8B, load_profile("h200"))
    choose_partition([4096] * 128, [(8192, 0), (2048, 100), (1024, 0), (512, 0)], 0.03, model, max_k=16)
    # At most the aggregated step, the decode step and 64 truncation levels per chunk prefix are built.
    assert CountingModel.works <= 2 + 4 * 64 and CountingModel.times <= 1000


@pytest.mark.parametrize("kwargs, match", [
    (dict(decode_context_lens=[-1]), "decode_context_lens"), (dict(prefill_chunks=[(0, 0)]), "prefill_chunks"),
    (dict(prefill_chunks=[(1,)]), "prefill_chunks"), (dict(tau=0.0), "tau"), (dict(tau=math.inf), "tau"),
    (dict(num_sms=133), "num_sms"), (dict(decode_sms_choices=[0]), "decode_sms_choices"),
    (dict(decode_sms_choices=[132]), "decode_sms_choices"), (dict(margin=1.0), "margin"), (dict(max_k=0), "max_k")])
def test_bad_arguments_raise(kwargs, match):
    args = dict(decode_context_lens=[10], prefill_chunks=[(4, 0)], tau=1e-3, model=MODEL) | kwargs
    with pytest.raises(ValueError, match=match):
        choose_partition(**args)


def test_default_decode_budgets_are_few_multiples_of_16():
    assert default_decode_sms_choices(132) == (16, 32, 48, 64, 80, 96, 112)
    assert default_decode_sms_choices(16) == (2, 4, 6, 8, 10, 12, 14)


def test_margin_and_correction_plan_against_a_tighter_objective():
    class Slower:  # a correction that says every step runs 30% slower than predicted
        def factor(self, kind, num_sms):
            return 1.3

    decode, chunks = [4096] * 64, [(2048, 0)]
    t_agg = MODEL.step_time([(1, c) for c in decode] + chunks, S)
    assert choose_partition(decode, chunks, t_agg * 1.05, MODEL).split is None
    for kwargs in (dict(margin=0.1), dict(correction=Slower())):
        d = choose_partition(decode, chunks, t_agg * 1.05, MODEL, prefer_tbt=True, **kwargs)
        assert d.split is not None
    d = choose_partition(decode, chunks, 0.03, MODEL, prefer_tbt=True, correction=Slower())
    assert d.split is not None and d.decode_step_time <= 0.03
    t_p, t_d = side_by_side(decode, chunks[:d.split.num_prefill_chunks - 1] + [(d.split.last_chunk_tokens, 0)], d.split.num_sms_decode)
    assert d.decode_step_time == pytest.approx(1.3 * t_d, rel=1e-12)
