"""Tensor parallelism when things go wrong: a rank killed mid-generation, or one that raises, ends the engine with an
error naming it and leaves no process behind; sizes that cannot run are refused before anything is spawned."""
import multiprocessing
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidu import SamplingParams
from minidu.engine_config import EngineConfig, check_tensor_parallel
from minidu.tp_executor import RankFailedError
from tests.engine.helpers import make_engine
from tests.models.checkpoints import write_checkpoint


def test_a_killed_rank_fails_the_step_and_every_later_one(tmp_path):
    write_checkpoint(tmp_path, "LlamaForCausalLM")
    engine = make_engine(tmp_path, tensor_parallel_size=2, distributed_timeout_s=5.0)
    [pid] = engine.executor.pids
    with engine:
        for prompt in ([5, 6, 7], [8, 9]):
            engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        engine.step()
        os.kill(pid, signal.SIGKILL)
        outputs = []
        with pytest.raises(RankFailedError, match=rf"rank 1 \(pid {pid}\) died: killed by signal SIGKILL") as failed:
            while engine.has_unfinished_requests():  # 16 tokens: the engine must notice long before the end
                outputs += engine.step().outputs
        assert not [o for o in outputs if o.finished], "no request may finish once its rank is gone"
        with pytest.raises(RankFailedError) as again:
            engine.step()
        assert again.value is failed.value
        with pytest.raises(RankFailedError):
            engine.add_request([5, 6])
    assert multiprocessing.active_children() == []


def test_a_rank_that_raises_fails_the_engine_with_its_error(tmp_path):
    """A NaN in the last row of a q_proj lies in rank 1's shard only: rank 0 loads its shard, rank 1's load raises,
    and the engine's construction reports rank 1's own exception."""
    write_checkpoint(tmp_path, "LlamaForCausalLM")
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"][-1, 0] = float("nan")
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(RankFailedError, match=r"rank 1 \(pid \d+\) raised ValueError: .*q_proj.weight.*NaN"):
        make_engine(tmp_path, tensor_parallel_size=2, distributed_timeout_s=5.0)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an int >= 1"),
    (dict(tensor_parallel_size=2.0), "tensor_parallel_size must be an int >= 1"),
    (dict(tensor_parallel_size=2, distributed_timeout_s=0), "distributed_timeout_s must be a number of seconds > 0"),
    (dict(tensor_parallel_size=2, distributed_timeout_s=float("inf")), "distributed_timeout_s must be"),
])
def test_bad_tensor_parallel_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig("model", **options)


def test_more_ranks_than_cuda_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_tensor_parallel(EngineConfig("model", tensor_parallel_size=2), torch.device("cuda"))
    with pytest.raises(ValueError, match="tensor_parallel_size=3 needs 3 CUDA devices, one a rank; 2 are visible"):
        check_tensor_parallel(EngineConfig("model", tensor_parallel_size=3), torch.device("cuda"))
    with pytest.raises(ValueError, match="device must be cuda or cuda:0, got cuda:1"):
        check_tensor_parallel(EngineConfig("model", tensor_parallel_size=2), torch.device("cuda", 1))
