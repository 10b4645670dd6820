"""Tensor parallelism from rank 0, the engine's own process: spawns one process per other rank, agrees the KV-cache
size with them, and each step broadcasts the plan before running its own shard of it. A rank that dies or raises ends
the engine with a RankFailedError naming it: the other ranks are stopped, since the model cannot run without its shard."""
import atexit
import logging
import multiprocessing.connection
import shutil
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minidu.model_runner import ModelRunner
from minidu.models.config import ModelConfig
from minidu.models.parallel import TensorParallel
from minidu.scheduler.plan import Plan, StepOutput
from minidu.tp_plan import ship_plan
from minidu.tp_worker import PLAN_WAIT, WorkerSetup, worker_main

logger = logging.getLogger("minidu")

# After rank 0's own part of a step raises, how long to wait for another rank's report: the rank that failed first
# (its exception, or its death closing the collectives' sockets) is the cause worth naming.
FAILURE_REPORT_WAIT_S = 5.0
STOP_WAIT_S = 10.0  # a clean stop's join, before the remaining ranks are killed


class RankFailedError(RuntimeError):
    """A tensor-parallel rank died or raised; the engine has stopped its other ranks and cannot run further steps."""


class TensorParallelExecutor:
    """Rank 0 of `tensor_parallel_size` ranks. Built in three stages by engine_config.build_parts: spawn and join
    (`__init__`, after which `tp` shards rank 0's model), `agree_num_kv_blocks`, then `start_runners`."""

    def __init__(self, setup: WorkerSetup):
        if dist.is_initialized():
            raise RuntimeError("this process already holds torch.distributed's default group (another "
                               "tensor-parallel engine?); shut that engine down first: one per process")
        self.size = setup.config.tensor_parallel_size
        self.runner: ModelRunner | None = None
        self.error: RankFailedError | None = None
        self._store = Path(tempfile.mkdtemp(prefix="minidu-tp-"))
        setup.init_method = f"file://{self._store / 'rendezvous'}"
        self._procs, self._conns = [], []
        self._stopped = False
        atexit.register(self.shutdown)
        try:
            self._spawn(setup)
            dist.init_process_group(setup.backend, init_method=setup.init_method, rank=0, world_size=self.size,
                                    timeout=timedelta(seconds=setup.config.distributed_timeout_s))
            self._plan_group = dist.new_group(backend="gloo", timeout=PLAN_WAIT)
        except BaseException:
            self.shutdown()
            raise
        self.tp = TensorParallel(0, self.size, dist.group.WORLD)
        logger.info("tensor parallel: %d ranks (%s), worker pids %s", self.size, setup.backend, self.pids)

    def _spawn(self, setup: WorkerSetup) -> None:
        context = mp.get_context("spawn")
        for rank in range(1, self.size):
            ours, theirs = context.Pipe()
            proc = context.Process(target=worker_main, args=(rank, setup, theirs), name=f"minidu-tp-rank{rank}",
                                   daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, rank 1 first."""
        return [p.pid for p in self._procs]

    def clock(self) -> float:
        return self.runner.clock()

    # ---- start-up ----

    def agree_num_kv_blocks(self, num_kv_blocks: int) -> int:
        """The fewest KV blocks any rank has room for (each rank sized its own device)."""
        return min([num_kv_blocks, *self._collect("num_kv_blocks")])

    def start_runners(self, model, model_config: ModelConfig, device: torch.device, options: dict) -> None:
        """Builds rank 0's ModelRunner with `options` while every other rank builds its own with the same options:
        CUDA graph capture runs the model, and so its collectives, on every rank at once."""
        for conn in self._conns:
            conn.send(options)
        self.runner = ModelRunner(model, model_config, device=device, **options)
        self._collect("running")

    def _collect(self, kind: str) -> list:
        """One `kind` message from every other rank, in rank order; a rank that dies or raises first fails the engine."""
        values = {}
        while len(values) < len(self._conns):
            waiting = [c for c in self._conns if c not in values]
            multiprocessing.connection.wait(waiting + [p.sentinel for p in self._procs])
            for rank, conn in enumerate(self._conns, start=1):
                if conn in waiting and conn.poll():
                    values[conn] = self._receive(rank, kind)
            self._check_alive()
        return [values[c] for c in self._conns]

    def _receive(self, rank: int, kind: str):
        """Rank `rank`'s next message, which must be `kind`; its error or its death fails the engine."""
        try:
            message, value = self._conns[rank - 1].recv()
        except (EOFError, OSError):
            self._fail(rank, self._death(rank))
        if message == "error":
            self._fail(rank, f"raised {value.strip()}")
        assert message == kind, f"rank {rank} sent {message!r} where {kind!r} was due"
        return value

    def _death(self, rank: int) -> str:
        proc = self._procs[rank - 1]
        proc.join(FAILURE_REPORT_WAIT_S)  # its pipe closes a moment before it can be reaped
        return _exit_cause(proc.exitcode)

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive():
                self._fail(rank, self._death(rank))

    # ---- steps ----

    def execute(self, plan: Plan) -> StepOutput:
        """Broadcasts the plan, runs rank 0's part of it; raises RankFailedError if any rank died or raised."""
        if self.error is not None:
            raise self.error
        self._check_ranks(0)
        try:
            dist.broadcast_object_list([ship_plan(plan)], src=0, group=self._plan_group)
            output = self.runner.execute(plan)
        except Exception as e:
            self._check_ranks(FAILURE_REPORT_WAIT_S)
            self._fail(0, f"raised {type(e).__name__}: {e}", e)
        self._check_ranks(0)
        return output

    def _check_ranks(self, timeout: float) -> None:
        """Fails the engine if, within `timeout` seconds, a rank reports an exception or dies (after start-up a
        rank sends nothing else)."""
        ready = multiprocessing.connection.wait(self._conns + [p.sentinel for p in self._procs], timeout)
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs), start=1):
            if conn in ready:
                self._receive(rank, "nothing")
            if proc.sentinel in ready:
                self._fail(rank, self._death(rank))

    def _fail(self, rank: int, cause: str, source: BaseException | None = None):
        pid = "" if rank == 0 else f" (pid {self._procs[rank - 1].pid})"
        self.error = RankFailedError(f"tensor-parallel rank {rank}{pid} {cause}; the engine stopped its other ranks "
                                     f"and cannot run further steps")
        logger.error("%s", self.error)
        self.shutdown()
        raise self.error from source

    # ---- shutdown ----

    def shutdown(self) -> None:
        """Stops every other rank (a clean stop when they are all well, else a kill) and leaves the process group."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        healthy = self.error is None and self.runner is not None and all(p.is_alive() for p in self._procs)
        if healthy:
            try:
                dist.broadcast_object_list([None], src=0, group=self._plan_group)
            except Exception:  # noqa: BLE001  (a rank that cannot hear the stop is killed below)
                logger.exception("could not broadcast the stop to the tensor-parallel ranks")
        for proc in self._procs:
            proc.join(STOP_WAIT_S if healthy else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._store, ignore_errors=True)


def _exit_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"died: killed by signal {signal.Signals(-exitcode).name}"
    return f"died: exited with code {exitcode}"
