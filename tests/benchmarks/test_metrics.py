"""Serving metrics against numbers computed by hand: percentiles by linear interpolation between order statistics,
per-request SLO judgement on TTFT and the request's own p99 gap, throughput over the first-arrival-to-last-token span,
and step mode shares."""
import pytest

from minidu.benchmarks.metrics import (meets_slo, mode_fraction, prediction_error, prediction_error_by_kind, serving_metrics,
                            steady_state, summarize, token_gaps, tracks_rate)
from minidu.outputs import RequestOutput


def output(rid: str, arrival: float, times: list[float], reason: str = "length") -> RequestOutput:
    return RequestOutput(rid, [1, 2], list(range(len(times))), "", True, reason, arrival_time=arrival,
                         first_token_time=times[0] if times else None, token_times=times)


# r0: TTFT 100 ms, gaps 20, 30, 10 ms; r1: TTFT 300 ms, gap 100 ms; r2: TTFT 50 ms, a single token.
RUN = [output("0", 0.0, [0.1, 0.12, 0.15, 0.16]), output("1", 0.5, [0.8, 0.9]), output("2", 1.0, [1.05])]


def test_summarize_interpolates_between_order_statistics():
    # sorted [10, 20, 30, 100]: p50 at rank 1.5, p90 at 2.7, p99 at 2.97
    assert summarize([30, 10, 100, 20]) == pytest.approx({"mean": 40, "p50": 25, "p90": 79, "p99": 97.9})
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_token_gaps():
    assert token_gaps([1.0, 1.5, 3.0]) == pytest.approx([0.5, 1.5])
    assert token_gaps([2.0]) == []


def test_serving_metrics_by_hand():
    m = serving_metrics(RUN, ["aggregated", "multiplexed", "aggregated", "aggregated"], ttft_slo_ms=200,
                        tbt_slo_ms=50, policy="duet", workload="w", rate=3.0, step_durations=[1, 3, 1, 1])
    assert (m["policy"], m["workload"], m["rate"], m["num_requests"], m["num_completed"]) == ("duet", "w", 3.0, 3, 3)
    assert m["duration_s"] == pytest.approx(1.05)  # first arrival 0 to last token 1.05
    assert m["throughput_req_s"] == pytest.approx(3 / 1.05)
    assert m["output_tok_s"] == pytest.approx(7 / 1.05)
    # TTFTs sorted [50, 100, 300] ms: p90 at rank 1.8, p99 at 1.98
    assert m["ttft_ms"] == pytest.approx({"mean": 150, "p50": 100, "p90": 260, "p99": 296})
    assert m["tbt_ms"] == pytest.approx({"mean": 40, "p50": 25, "p90": 79, "p99": 97.9})
    # r0 meets both (its p99 gap is 29.8 ms), r1 misses TTFT, r2 has no gaps and meets TTFT
    assert m["slo_attainment"] == pytest.approx(2 / 3)
    assert m["goodput_req_s"] == pytest.approx(2 / 1.05)
    assert m["mode_fraction"] == pytest.approx({"aggregated": 0.75, "multiplexed": 0.25})
    assert m["mode_time_fraction"] == pytest.approx({"aggregated": 0.5, "multiplexed": 0.5})


def test_one_slow_gap_breaks_a_short_request_but_not_a_long_one():
    # 10 gaps, one of 200 ms: p99 at rank 8.91 = 10 + 0.91 * 190 = 182.9 ms > 50 ms
    short = [0.01 * i for i in range(10)] + [0.09 + 0.2]
    # 100 gaps, one of 200 ms: p99 at rank 98.01 = 10 + 0.01 * 190 = 11.9 ms <= 50 ms
    long = [0.01 * i for i in range(100)] + [0.99 + 0.2]
    assert not meets_slo(output("s", 0.0, short), ttft_slo=1.0, tbt_slo=0.05)
    assert meets_slo(output("l", 0.0, long), ttft_slo=1.0, tbt_slo=0.05)
    assert not meets_slo(output("l", 0.0, long), ttft_slo=1.0, tbt_slo=0.0118)


def test_slos_are_inclusive():
    r = output("0", 1.0, [1.25, 1.5])  # exact in binary: TTFT and the gap are both 0.25 s
    assert meets_slo(r, ttft_slo=0.25, tbt_slo=0.25)
    assert not meets_slo(r, ttft_slo=0.2499, tbt_slo=0.25)
    assert not meets_slo(r, ttft_slo=0.25, tbt_slo=0.2499)


def test_aborted_request_counts_and_fails():
    rejected = output("x", 0.2, [], reason="abort")
    m = serving_metrics([*RUN, rejected], [], ttft_slo_ms=200, tbt_slo_ms=50)
    assert (m["num_requests"], m["num_completed"]) == (4, 3)
    assert m["slo_attainment"] == pytest.approx(2 / 4)
    assert m["ttft_ms"]["mean"] == pytest.approx(150)  # the rejected request has no TTFT
    assert m["mode_fraction"] == {"aggregated": 0.0, "multiplexed": 0.0} and m["mode_time_fraction"] is None


def test_mode_fraction_validates():
    assert mode_fraction(["multiplexed"] * 3) == {"aggregated": 0.0, "multiplexed": 1.0}
    with pytest.raises(ValueError, match="modes"):
        mode_fraction(["disaggregated"])
    with pytest.raises(ValueError, match="weights"):
        mode_fraction(["aggregated"], [1.0, 2.0])


def test_serving_metrics_validates():
    with pytest.raises(ValueError, match="outputs"):
        serving_metrics([], [], ttft_slo_ms=1, tbt_slo_ms=1)
    with pytest.raises(ValueError, match="tbt_slo_ms"):
        serving_metrics(RUN, [], ttft_slo_ms=1, tbt_slo_ms=0)


def test_prediction_error_over_steps_with_predictions():
    err = prediction_error([1.0, 2.0, 4.0, 1.0], [1.1, 1.0, None, 1.0])
    assert err["num_steps"] == 3
    assert err["median"] == pytest.approx(0.1) and err["mean"] == pytest.approx((0.1 + 0.5 + 0.0) / 3)
    assert err["p90"] == pytest.approx(0.1 + 0.8 * 0.4)  # between 0.1 and 0.5 at 90% of the way
    assert prediction_error([1.0], [None]) is None and prediction_error(None, None) is None


def test_steady_state_drops_the_first_and_last_arrivals():
    outputs = [output(str(i), float(9 - i), [10.0 + i]) for i in range(10)]  # arrivals out of order
    window = steady_state(outputs, warmup=0.2, drain=0.1)
    assert [o.arrival_time for o in window] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    with pytest.raises(ValueError, match="warmup"):
        steady_state(outputs, 0.5, 0.5)


def test_tracks_rate_counts_completions_within_the_window():
    # One arrival a second from t = 0 to 9; the window is arrivals 1..8 (t = 1..8).
    keeping_up = [output(str(i), float(i), [i + 0.5]) for i in range(10)]  # each done half a second later
    window = steady_state(keeping_up, 0.1, 0.1)
    assert tracks_rate(keeping_up, window)  # completions 1.5 .. 7.5 in [1, 8]: 7, one per gap
    falling_behind = [output(str(i), float(i), [2.0 * i + 0.5]) for i in range(10)]  # 2.5, 4.5, 6.5 in [1, 8]
    assert not tracks_rate(falling_behind, steady_state(falling_behind, 0.1, 0.1))


def test_prediction_error_by_kind():
    parts = [("aggregated", 132, 1.0, 2.0), ("decode", 16, 0.9, 1.0), ("decode", 32, 1.2, 1.0),
             ("decode", 16, 1.0, 1.0)]
    report = prediction_error_by_kind(parts)
    assert report["aggregated"]["median"] == pytest.approx(0.5)
    assert report["multiplexed decode"]["median"] == pytest.approx(0.1) and report["multiplexed decode"][
        "num_steps"] == 3
    assert report["multiplexed decode"]["p90"] == pytest.approx(0.1 + 0.8 * (0.2 - 0.1))
    assert report["multiplexed prefill"] is None
    with pytest.raises(ValueError, match="kinds"):
        prediction_error_by_kind([("mixed", 1, 1.0, 1.0)])
