"""KV-cache sizing after the weights (with injected memory numbers), and the decode budgets graphs are captured for."""
import logging

import pytest
import torch

import minidu
from minidu import engine_config
from minidu.engine_config import (EngineConfig, MemorySplit, decode_sms_choices,
                                  kv_blocks_of_split, make_policy, num_kv_blocks_for)
from minidu.models.config import ModelConfig
from minidu.models.presets import MODEL_PRESETS
from minidu.scheduler.hardware import load_profile
from minidu.scheduler.partition import default_decode_sms_choices
from minidu.scheduler.policy import DuetPolicy, StaticPolicy
from minidu.scheduler.roofline import LatencyModel
from tests.engine.helpers import make_engine
from tests.models.checkpoints import write_checkpoint

GIB = 2**30


def preset_config(name: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(MODEL_PRESETS[name], name)


def kv_bytes_per_token(c) -> int:
    """K and V of every layer and kv head, in bf16."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2


def test_qwen3_8b_on_h200_fits_with_its_weights(caplog):
    # H200-like numbers: 140 GiB, 15.3 GiB of weights (and the CUDA context) in use after loading, 3 GiB peak.
    c = preset_config("qwen3-8b")
    total, used, peak = 140 * GIB, int(15.3 * GIB), 3 * GIB
    cfg = EngineConfig("qwen3-8b", gpu_memory_utilization=0.9)
    with caplog.at_level(logging.INFO, logger="minidu"):
        blocks = kv_blocks_of_split(MemorySplit(total, 0.9, used, peak), cfg, c, torch.bfloat16)
    kv = blocks * cfg.block_size * kv_bytes_per_token(c)
    assert used + peak + kv <= 0.9 * total, "weights, activations and KV must fit the utilization"
    assert 0.9 * total - used - peak - kv < cfg.block_size * kv_bytes_per_token(c), "the rest must go to the KV cache"
    assert "15.30 GiB in use after loading" in caplog.text and "KV cache" in caplog.text


def test_no_room_for_kv_is_refused():
    c = preset_config("qwen3-8b")
    cfg = EngineConfig("qwen3-8b", gpu_memory_utilization=0.2)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_blocks_of_split(MemorySplit(80 * GIB, 0.2, 16 * GIB, GIB), cfg, c, torch.bfloat16)


def test_cuda_sizing_reads_memory_after_loading(monkeypatch):
    """On CUDA the free memory is read after the weights are loaded and the peak forward is profiled."""
    c = preset_config("qwen3-0.6b")
    calls = []
    monkeypatch.setattr(engine_config, "profile_peak_activation",
                        lambda model, *a: calls.append(("profile", model)) or 2 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append("mem") or (60 * GIB, 80 * GIB))
    cfg = EngineConfig("qwen3-0.6b", gpu_memory_utilization=0.5, block_size=16)
    blocks = num_kv_blocks_for(cfg, c, torch.device("cuda"), torch.bfloat16, model="the model")
    assert calls == [("profile", "the model"), "mem"]
    expected = (0.5 * 80 * GIB - 20 * GIB - 2 * GIB) // (16 * kv_bytes_per_token(c))
    assert blocks == expected


def test_simulated_sizing_leaves_room_for_weights():
    c = preset_config("qwen3-8b")
    cfg = EngineConfig("qwen3-8b", backend="sim")
    blocks = engine_config.sim_num_kv_blocks(cfg, c, load_profile("h200"), torch.bfloat16)
    weights = 8.19e9 * 2  # Qwen3-8B's parameters in bf16, within a percent
    assert blocks * cfg.block_size * kv_bytes_per_token(c) + 0.99 * weights <= 0.9 * 141e9


def test_budget_set_and_policies():
    latency = LatencyModel(engine_config.model_shape(preset_config("qwen3-8b"), torch.bfloat16), load_profile("h200"))
    static = EngineConfig("x", policy="static")
    choices = decode_sms_choices(static, 132)
    policy = make_policy(static, latency, 132, choices)
    assert isinstance(policy, StaticPolicy) and policy.decode_sms == 64, "the budget nearest half, in the set"
    assert policy.decode_sms_choices == choices == default_decode_sms_choices(132)
    assert 66 in decode_sms_choices(EngineConfig("x", policy="static", decode_sms=66), 132)
    duet = EngineConfig("x", policy="duet", tbt_slo_ms=50)
    policy = make_policy(duet, latency, 132, decode_sms_choices(duet, 132))
    assert isinstance(policy, DuetPolicy) and policy.decode_sms_choices == default_decode_sms_choices(132)
    odd = EngineConfig("x", policy="duet", tbt_slo_ms=50, decode_sms_choices=(16, 40))
    assert make_policy(odd, latency, 132, decode_sms_choices(odd, 132)).decode_sms_choices == (16, 40)
    with pytest.raises(ValueError, match="leave prefill no SM"):
        decode_sms_choices(EngineConfig("x", policy="duet", tbt_slo_ms=50, decode_sms_choices=(16, 132)), 132)
    for bad in ((), (0, 16), [16, 1.5], 16):
        with pytest.raises(ValueError, match="decode_sms_choices"):
            EngineConfig("x", decode_sms_choices=bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    write_checkpoint(path, "Qwen3ForCausalLM")
    return path


def test_runner_knows_its_graphs_and_refuses_other_budgets(checkpoint):
    engine = make_engine(checkpoint, policy="static", hardware="h200", max_num_seqs=8)
    runner = engine.executor
    budgets = [None, *range(16, 113, 16)]  # the whole GPU, and the default decode_sms_choices of 132 SMs
    assert runner.graph_keys == [(b, s) for s in budgets for b in (1, 2, 4, 8)]
    with pytest.raises(RuntimeError, match="no CUDA graph was captured .* 40 SMs"):
        runner._graph(4, 40)
    assert isinstance(engine, minidu.Engine)
