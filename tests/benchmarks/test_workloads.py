"""Workload generation: seeded determinism, arrival-rate and burstiness statistics, length distributions near their
documented means and within bounds, prompt ids within the vocabulary, and trace-file parsing with precise errors."""
import math

import numpy as np
import pytest

from minidu.benchmarks.workloads import (TRACE_SHAPES, RequestSpec, arrival_times, load_trace, prompt_token_ids,
                              random_lengths, synthetic_workload)


@pytest.mark.parametrize("name", ["fixed", "random", "azure-code", "azure-conv", "mooncake"])
def test_same_seed_same_workload_other_seed_differs(name):
    a = synthetic_workload(name, 50, 3.0, seed=7)
    assert a == synthetic_workload(name, 50, 3.0, seed=7)
    assert a != synthetic_workload(name, 50, 3.0, seed=8)
    assert all(isinstance(s, RequestSpec) and s.input_len >= 1 and s.output_len >= 1 for s in a)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_mean_one_over_rate_and_cv_one_over_sqrt_shape(burstiness):
    times = np.array(arrival_times(40_000, 5.0, burstiness, seed=1))
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert (gaps >= 0).all()
    # 40k samples: the sample mean's relative error is ~ cv / 200 <= 1%, the CV's a few % at shape 0.25.
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(5, math.inf) == [0.0] * 5


def test_random_lengths_uniform_within_range_ratio():
    lengths = np.array(random_lengths(20_000, 1000, 0.25, seed=3))
    assert lengths.min() >= 750 and lengths.max() <= 1250
    assert lengths.min() < 760 and lengths.max() > 1240  # the whole range is used
    assert lengths.mean() == pytest.approx(1000, rel=0.01)


def test_fixed_workload_uses_given_lengths():
    specs = synthetic_workload("fixed", 10, 2.0, input_len=333, output_len=44)
    assert {(s.input_len, s.output_len) for s in specs} == {(333, 44)}


@pytest.mark.parametrize("name", list(TRACE_SHAPES))
def test_trace_shapes_match_documented_means_and_bounds(name):
    specs = synthetic_workload(name, 20_000, 1.0, seed=5)
    for lengths, shape in zip(([s.input_len for s in specs], [s.output_len for s in specs]), TRACE_SHAPES[name]):
        lengths = np.array(lengths)
        assert shape.low <= lengths.min() and lengths.max() <= shape.high
        assert lengths.mean() == pytest.approx(shape.mean, rel=0.08)  # clipping and sampling move it a few %
        assert np.median(lengths) < lengths.mean()  # right-skewed like the traces


def test_published_scales_of_the_traces():
    code, conv, mooncake = (TRACE_SHAPES[n] for n in ("azure-code", "azure-conv", "mooncake"))
    assert 1500 <= code[0].mean <= 2500 and code[1].mean <= 40
    assert 800 <= conv[0].mean <= 1300 and 100 <= conv[1].mean <= 200
    assert 7000 <= mooncake[0].mean <= 12000 and 150 <= mooncake[1].mean <= 300


def test_prompt_ids_in_vocab_reproducible_and_distinct_per_request():
    ids = prompt_token_ids(5000, 1000, seed=2, index=3)
    assert len(ids) == 5000 and min(ids) >= 0 and max(ids) < 1000 and len(set(ids)) > 900
    assert ids == prompt_token_ids(5000, 1000, seed=2, index=3)
    assert ids != prompt_token_ids(5000, 1000, seed=2, index=4)


@pytest.mark.parametrize("kwargs, name", [(dict(rate=0.0), "rate"), (dict(burstiness=0.0), "burstiness"),
                                          (dict(num_requests=0), "num_requests"),
                                          (dict(name="sharegpt"), "workload"), (dict(range_ratio=1.0, name="random"),
                                                                                "range_ratio")])
def test_bad_arguments_raise_naming_them(kwargs, name):
    args = dict(name="fixed", num_requests=4, rate=1.0) | kwargs
    with pytest.raises(ValueError, match=name):
        synthetic_workload(**args)


def write(tmp_path, text: str):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_load_trace_shifts_to_zero_and_truncates(tmp_path):
    path = write(tmp_path, "timestamp,input_len,output_len\n10.5,100,5\n11.0,200,6\n\n12.25,300,7\n")
    assert load_trace(path) == [RequestSpec(0.0, 100, 5), RequestSpec(0.5, 200, 6), RequestSpec(1.75, 300, 7)]
    assert load_trace(path, num_requests=2) == [RequestSpec(0.0, 100, 5), RequestSpec(0.5, 200, 6)]


def test_load_trace_accepts_extra_columns_in_any_order(tmp_path):
    path = write(tmp_path, "output_len, model ,input_len,timestamp\n9,x,17,3\n")
    assert load_trace(path) == [RequestSpec(0.0, 17, 9)]


@pytest.mark.parametrize("text, message", [
    ("time,input_len,output_len\n1,2,3\n", r"missing column\(s\) \['timestamp'\]"),
    ("timestamp,input_len,output_len\n0,10,5\n1,ten,5\n", "line 3, column input_len: expected an int, got 'ten'"),
    ("timestamp,input_len,output_len\n0,10,5\n1,10,\n", "line 3, column output_len"),
    ("timestamp,input_len,output_len\n0,10,0\n", "line 2, column output_len: must be >= 1"),
    ("timestamp,input_len,output_len\n-1,10,5\n", "line 2, column timestamp: must be a finite number >= 0"),
    ("timestamp,input_len,output_len\n5,10,5\n4,10,5\n", "line 3, column timestamp: 4.0 is before"),
    ("timestamp,input_len,output_len\n", "no requests"),
    ("", "missing column"),
])
def test_load_trace_errors_name_row_and_column(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_trace(write(tmp_path, text))


def test_load_trace_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        load_trace(tmp_path / "nope.csv")
