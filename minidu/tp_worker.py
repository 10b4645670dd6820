"""A tensor-parallel rank other than 0, in its own process: joins the process group, builds its shard of the model and
a ModelRunner, then runs every plan rank 0 broadcasts until it broadcasts None. Its control pipe to rank 0 carries
start-up messages and its exception, if it raises."""
import os
import signal
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from minidu.engine_config import EngineConfig, num_kv_blocks_for
from minidu.model_runner import ModelRunner
from minidu.models.config import ModelConfig
from minidu.models.loader import build_model
from minidu.models.parallel import TensorParallel

# Idle ranks wait for the next plan as long as the engine idles; dead peers are found by rank 0's process watch and
# by closed sockets, not by this timeout (gloo counts it in nanoseconds, so it must stay far below 292 years).
PLAN_WAIT = timedelta(days=365)


@dataclass(slots=True)
class WorkerSetup:
    """What every rank needs to build its part, decided once by rank 0."""

    config: EngineConfig
    path: Path | None  # the resolved checkpoint (None: a preset with random weights)
    model_config: ModelConfig
    dtype: torch.dtype
    init_method: str  # the process group's rendezvous (a file:// store)
    device_type: str  # cuda (one GPU a rank, NCCL) or cpu (gloo)

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"


def rank_device(device_type: str, rank: int) -> torch.device:
    """Rank `rank`'s device: cuda:rank on CUDA (one GPU a rank), else the CPU."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def join_group(rank: int, setup: WorkerSetup) -> tuple[TensorParallel, dist.ProcessGroup]:
    """Joins the default group (the model's collectives, with the engine's timeout) and a gloo group for plans."""
    size = setup.config.tensor_parallel_size
    dist.init_process_group(setup.backend, init_method=setup.init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=setup.config.distributed_timeout_s))
    plan_group = dist.new_group(backend="gloo", timeout=PLAN_WAIT)
    return TensorParallel(rank, size, dist.group.WORLD), plan_group


def receive_plan(plan_group: dist.ProcessGroup):
    """The next plan rank 0 broadcasts (None: stop)."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=plan_group)
    return box[0]


def _exit_with_parent(conn) -> None:
    """Rank 0 never sends after start-up, so the pipe's end means it is gone: leave rather than wait for a plan."""
    try:
        conn.recv()
    except (EOFError, OSError):
        pass
    os._exit(1)


def worker_main(rank: int, setup: WorkerSetup, conn) -> None:
    """The spawned process of rank `rank` (>= 1)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 owns the engine's lifetime: a ^C reaches it, not us
    try:
        cfg = setup.config
        tp, plan_group = join_group(rank, setup)
        device = rank_device(setup.device_type, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = build_model(setup.path, setup.model_config, dtype=setup.dtype, device=device,
                            load_format=cfg.load_format, seed=cfg.seed, tp=tp)
        conn.send(("num_kv_blocks", num_kv_blocks_for(cfg, setup.model_config, device, setup.dtype, model)))
        runner = ModelRunner(model, setup.model_config, device=device, **conn.recv())
        conn.send(("running", None))
        threading.Thread(target=_exit_with_parent, args=(conn,), daemon=True).start()
        while (plan := receive_plan(plan_group)) is not None:
            runner.execute(plan)
    except BaseException as e:  # noqa: BLE001  (whatever stops this rank, rank 0 must learn why)
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        finally:
            os._exit(1)
    dist.destroy_process_group()
