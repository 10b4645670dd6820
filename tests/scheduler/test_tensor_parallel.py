"""Tensor parallelism in the latency model: one rank's FLOPs and bytes counted by hand, the ring collectives over the
interconnect, refusals of sizes that do not shard, and a simulated engine at tensor_parallel_size=2."""
import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

import minidu
from minidu import SamplingParams
from minidu.engine_config import EngineConfig, kv_bytes_per_block
from minidu.models.config import ModelConfig
from minidu.models.presets import MODEL_PRESETS
from minidu.scheduler.hardware import HardwareProfile, load_profile
from minidu.scheduler.roofline import LatencyModel, ModelShape

# 2 layers, hidden 64, 4 query heads and 2 kv heads of 16, intermediate 128, an odd vocab of 101, bf16, on 2 ranks:
# each rank has 2 query heads, 1 kv head, intermediate 64 and 51 vocab rows (the second shard padded by one).
TINY_TP2 = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                      vocab_size=101, tensor_parallel_size=2)
REQUESTS = [(3, 5), (1, 7)]  # T = 4 new tokens, 2 sampled rows
LINK_BANDWIDTH, LINK_LATENCY = 1e8, 1e-6


def profile(flops: float, bandwidth: float, **physics) -> HardwareProfile:
    """2 SMs and 1-element GEMM tiles: every GEMM below runs in whole waves, so the hand counts hold."""
    return HardwareProfile("test", 2, flops, bandwidth, 2, layer_overhead=0.0, gemm_tile=1,
                           interconnect_bandwidth=LINK_BANDWIDTH, interconnect_latency=LINK_LATENCY, **physics)


def causal_pairs(q: int, c: int) -> int:
    return sum(c + j + 1 for j in range(q))


# One rank's operators per layer for REQUESTS (T = 4), (FLOPs, bytes) at 2 bytes per element.
RANK_LAYER_OPS = [
    (0, 2 * (4 * 4 * 64 + 64)),  # input norm, whole hidden on every rank
    (2 * 4 * 64 * 64, 2 * (64 * 64 + 4 * 64 + 4 * 64)),  # qkv: 64 = (2 + 2 * 1) * 16 output columns
    (0, 2 * 2 * 4 * (32 + 16)),  # rotary on q [4, 32] and k [4, 16]
    (0, 2 * 4 * 4 * 16),  # kv store of one kv head
    (4 * 2 * 16 * causal_pairs(3, 5), 2 * 16 * (2 * 3 * 2 + 2 * 8 * 1)),  # attention (3, 5), 2 heads
    (4 * 2 * 16 * causal_pairs(1, 7), 2 * 16 * (2 * 1 * 2 + 2 * 8 * 1)),  # attention (1, 7)
    (2 * 4 * 64 * 32, 2 * (64 * 32 + 4 * 32 + 4 * 64)),  # o: [4, 32] x [64, 32]^T (row-parallel)
    (0, 2 * (4 * 4 * 64 + 64)),  # post-attention norm
    (2 * 4 * 128 * 64, 2 * (128 * 64 + 4 * 64 + 4 * 128)),  # gate_up: 2 x 64 columns
    (0, 2 * (4 * 128 + 4 * 64)),  # silu_and_mul
    (2 * 4 * 64 * 64, 2 * (64 * 64 + 4 * 64 + 4 * 64)),  # down: [4, 64] x [64, 64]^T (row-parallel)
]
RANK_HEAD_OPS = [
    (0, 2 * (4 * 4 * 64 + 64)),  # final norm
    (2 * 2 * 51 * 64, 2 * (51 * 64 + 2 * 64 + 2 * 51)),  # LM head shard on 2 rows
]


def collectives() -> float:
    """5 ring all-reduces of the [4, 64] activations (embedding, then o and down in each of 2 layers) and one ring
    all-gather of 2 rows x 102 padded logits; a ring moves (N-1)/N of the data per pass, an all-reduce two passes."""
    all_reduce = 2 * (1 / 2) * (4 * 64 * 2) / LINK_BANDWIDTH + LINK_LATENCY
    all_gather = (1 / 2) * (2 * 102 * 2) / LINK_BANDWIDTH + LINK_LATENCY
    return 5 * all_reduce + all_gather


def test_rank_sizes_shard_and_replicate():
    assert (TINY_TP2.rank_heads, TINY_TP2.rank_kv_heads, TINY_TP2.rank_intermediate_size,
            TINY_TP2.rank_vocab_size) == (2, 1, 64, 51)
    replicated = dataclasses.replace(TINY_TP2, tensor_parallel_size=4)  # 2 kv heads on 4 ranks: one each, copied
    assert (replicated.rank_heads, replicated.rank_kv_heads, replicated.rank_vocab_size) == (1, 1, 26)


def test_bytes_of_one_rank_plus_the_collectives():
    model = LatencyModel(TINY_TP2, profile(flops=1e30, bandwidth=1e9))
    rank_bytes = 2 * sum(b for _, b in RANK_LAYER_OPS) + sum(b for _, b in RANK_HEAD_OPS)
    assert model.step_time(REQUESTS, 2) == pytest.approx(rank_bytes / 1e9 + collectives(), rel=1e-12)


def test_flops_of_one_rank_plus_the_collectives():
    model = LatencyModel(TINY_TP2, profile(flops=1e9, bandwidth=1e30))
    rank_flops = 2 * sum(f for f, _ in RANK_LAYER_OPS) + sum(f for f, _ in RANK_HEAD_OPS)
    assert model.step_time(REQUESTS, 2) == pytest.approx(rank_flops / 1e9 + collectives(), rel=1e-12)


def total_flops(model: LatencyModel, requests) -> float:
    work = model.work(requests)
    return work.flops_from[0] + sum(g[2] for g in work.gemms)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_rank_flops_are_the_whole_models_divided_by_the_ranks(ranks):
    """Qwen3-8B's heads, kv heads, MLP and vocabulary all divide by 2, 4 and 8, and norms have no FLOPs."""
    shape = ModelShape(36, 4096, 32, 8, 128, 12288, 151936, qk_norm=True)
    hw = load_profile("h200")
    whole = LatencyModel(shape, hw)
    rank = LatencyModel(dataclasses.replace(shape, tensor_parallel_size=ranks), hw)
    requests = [(512, 0), (1, 3000), (1, 200)]
    assert total_flops(rank, requests) * ranks == pytest.approx(total_flops(whole, requests), rel=1e-12)
    # Weights divide; norms and the residual stream do not, so a rank moves more than 1/N of the bytes; in decode
    # the weights dominate and a rank moves barely more than 1/N.
    assert whole.work(requests).total_bytes / ranks < rank.work(requests).total_bytes < whole.work(requests).total_bytes
    decode = [(1, 3000), (1, 200)]
    assert whole.work(decode).total_bytes / ranks < rank.work(decode).total_bytes < \
        whole.work(decode).total_bytes / ranks * 1.01


def test_one_rank_has_no_collectives_and_ignores_the_interconnect():
    shape = dataclasses.replace(TINY_TP2, vocab_size=100, tensor_parallel_size=1)
    with_link = LatencyModel(shape, profile(1e9, 1e9))
    without = LatencyModel(shape, dataclasses.replace(profile(1e9, 1e9), interconnect_bandwidth=0.0))
    assert with_link.work(REQUESTS).collective_time == 0.0
    assert with_link.step_time(REQUESTS, 2) == without.step_time(REQUESTS, 2)


def test_collectives_run_in_each_partition_whatever_its_sms():
    """On a device with unbounded compute and HBM only the collectives take time, on 1 SM as on 2, and decode's
    beside prefill are slowed by the co-run factor like the rest of its step."""
    hw = profile(flops=1e30, bandwidth=1e30, corun_decode_slowdown=0.5)
    model = LatencyModel(TINY_TP2, hw)
    prefill, decode = model.work([(3, 5)]), model.work([(1, 7)])
    prefill_comm = 5 * (3 * 64 * 2 / LINK_BANDWIDTH + LINK_LATENCY) + 102 * 2 / 2 / LINK_BANDWIDTH + LINK_LATENCY
    decode_comm = 5 * (64 * 2 / LINK_BANDWIDTH + LINK_LATENCY) + 102 * 2 / 2 / LINK_BANDWIDTH + LINK_LATENCY
    t_p, t_d = model.multiplexed_times(prefill, 1, decode, 1)
    assert t_p == pytest.approx(prefill_comm, rel=1e-9)
    assert t_d == pytest.approx(decode_comm * 1.5, rel=1e-9)


@pytest.mark.parametrize("change, match", [
    ({"tensor_parallel_size": 3}, r"tensor_parallel_size=3 must divide num_heads \(4\)"),
    ({"num_heads": 8, "intermediate_size": 100, "tensor_parallel_size": 8}, "must divide intermediate_size"),
    ({"num_heads": 12, "num_kv_heads": 6, "tensor_parallel_size": 4}, "num_kv_heads"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"tensor_parallel_size": True}, "tensor_parallel_size"),
])
def test_shapes_that_do_not_shard_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY_TP2, **change)


def test_ranks_without_a_known_interconnect_are_refused():
    hw = dataclasses.replace(profile(1e9, 1e9), interconnect_bandwidth=0.0)
    with pytest.raises(ValueError, match="interconnect_bandwidth"):
        LatencyModel(TINY_TP2, hw)


def test_engine_config_checks_tensor_parallel_size():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig("qwen3-0.6b", backend="sim", tensor_parallel_size=0)
    assert EngineConfig("qwen3-0.6b", tensor_parallel_size=1).tensor_parallel_size == 1


def test_sim_engine_refuses_a_size_that_does_not_divide_the_heads():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide num_heads \(40\)"):
        minidu.Engine("qwen3-14b", backend="sim", hardware="h200", tensor_parallel_size=3)


def test_kv_block_bytes_are_one_ranks_kv_heads():
    config = ModelConfig.from_hf_dict(MODEL_PRESETS["qwen3-14b"])
    # 2 (k and v) x 40 layers x kv heads on the rank x 128 x 16 tokens x 2 bytes; 8 kv heads on 16 ranks: one each.
    assert [kv_bytes_per_block(config, 16, torch.bfloat16, n) for n in (1, 2, 16)] == [
        2 * 40 * h * 128 * 16 * 2 for h in (8, 4, 1)]


def test_sim_engine_at_two_ranks_serves_a_workload():
    def engine(ranks: int) -> minidu.Engine:
        return minidu.Engine("qwen3-14b", backend="sim", hardware="h200", policy="duet", tbt_slo_ms=50,
                             tensor_parallel_size=ranks)

    one, two = engine(1), engine(2)
    # Half the weights and half the kv heads per rank: more than twice the KV blocks of one GPU.
    assert two.scheduler.block_manager.num_blocks > 2 * one.scheduler.block_manager.num_blocks
    assert two.latency_model.shape.tensor_parallel_size == 2
    prompts = [list(range(1, 1 + n)) for n in (700, 40, 3000)]
    outputs = two.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in outputs] == [5, 5, 5]
    reference = LatencyModel(ModelShape(40, 5120, 40, 8, 128, 17408, 151936, qk_norm=True, tensor_parallel_size=2),
                             load_profile("h200"))
    assert two.latency_model.step_time([(700, 0), (1, 40)], 132) == reference.step_time([(700, 0), (1, 40)], 132)


def test_bench_serving_flag_reaches_the_engine(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "scripts"))
    import bench_serving

    parser = argparse.ArgumentParser()
    bench_serving.add_engine_args(parser)  # sweep_capacity's engine options too
    args = parser.parse_args(["--model", "qwen3-14b", "--tensor-parallel-size", "2"])
    engine = bench_serving.make_engine(args, "aggregated")
    assert engine.config.tensor_parallel_size == engine.latency_model.shape.tensor_parallel_size == 2
