"""Tensor-parallel ranks for tests on the CPU: `RankPool(3)` spawns three worker processes joined in one gloo process
group (with a sub-group of ranks 0..n-1 for every n), and `pool.run(fn, n, *args)` calls fn(TensorParallel(rank, n,
group), *args) on ranks 0..n-1 and returns their results in rank order; `generate_on_rank` is such an fn."""
import queue
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minidu.models.config import ModelConfig
from minidu.models.gguf_loader import read_gguf
from minidu.models.loader import build_model
from minidu.models.parallel import TensorParallel
from tests.models.paged import PagedRunner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, tasks, results, timeout_s: float) -> None:
    torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    # Every rank takes part in creating every group, member or not.
    groups = {n: dist.new_group(list(range(n))) for n in range(2, world_size + 1)}
    while (task := tasks.get()) is not None:
        fn, size, args = task
        try:
            out = fn(TensorParallel(rank, size, groups[size]), *args) if rank < size else None
            results.put((rank, None, out))
        except Exception:
            results.put((rank, traceback.format_exc(), None))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, timeout_s: float = 120.0):
        ctx = mp.get_context("spawn")
        self.timeout_s = timeout_s
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(rank, world_size, port, self.tasks[rank], self.results,
                                                       timeout_s), daemon=True)
                      for rank in range(world_size)]
        for proc in self.procs:
            proc.start()

    def run(self, fn, size: int, *args) -> list:
        """fn(tp, *args) on ranks 0..size-1 (the other ranks idle); AssertionError with a rank's traceback if it
        raised, RuntimeError if a rank gave no answer within the timeout."""
        for tasks in self.tasks:
            tasks.put((fn, size, args))
        outputs, errors = {}, []
        for _ in self.procs:
            try:
                rank, error, out = self.results.get(timeout=self.timeout_s)
            except queue.Empty:
                raise RuntimeError(f"a rank gave no result within {self.timeout_s} s") from None
            outputs[rank] = out
            if error is not None:
                errors.append(f"rank {rank}:\n{error}")
        if errors:
            raise AssertionError("\n".join(errors))
        return [outputs[rank] for rank in range(size)]

    def close(self) -> None:
        for tasks in self.tasks:
            tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_config(path: Path) -> ModelConfig:
    if path.suffix == ".gguf":
        return ModelConfig.from_hf_dict(read_gguf(path)[0], str(path))
    return ModelConfig.from_pretrained(path)


def generate_on_rank(tp: TensorParallel, path: Path | None, config: ModelConfig, prompts: dict[str, list[int]],
                     load_format: str = "auto") -> tuple[dict[tuple[str, int], torch.Tensor], dict[str, list[int]]]:
    """Rank tp.rank's shard (fp32) through a paged cache: request a's 5-token prompt with b's first 3 tokens, then the
    rest of b (extending its cached prefix) beside a's first decode, then one decode of both; decoded tokens are
    greedy from the logits. Returns the logits by (request, position) and each request's decoded tokens."""
    model = build_model(path, config, dtype=torch.float32, device="cpu", load_format=load_format, seed=5, tp=tp)
    runner = PagedRunner(model, seed=11)
    a, b = prompts["a"], prompts["b"]
    logits = {}

    def step(prefill, decode) -> None:
        out, rows = runner.step(prefill, decode)
        logits.update(zip(rows, out))

    def greedy(rid: str, pos: int) -> int:
        return int(logits[(rid, pos)].argmax())

    step([("a", a), ("b", b[:3])], [])
    decoded = {"a": [greedy("a", len(a) - 1)]}
    step([("b", b[3:])], [("a", decoded["a"][0])])
    decoded["a"].append(greedy("a", len(a)))
    decoded["b"] = [greedy("b", len(b) - 1)]
    step([], [("a", decoded["a"][1]), ("b", decoded["b"][0])])
    decoded["a"].append(greedy("a", len(a) + 1))
    decoded["b"].append(greedy("b", len(b)))
    return logits, decoded
