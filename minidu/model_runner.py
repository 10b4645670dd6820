"""Carries out execution plans on the model: builds each step's metadata on the host, copies it to the device in one
transfer, runs the forward pass and samples. A multiplexed plan runs its prefill batch and its k look-ahead decode steps
on two lanes (CUDA streams) with disjoint SM budgets, with or without CUDA graphs; on CUDA, decode steps replay graphs
captured at start-up for every (batch bucket, decode budget)."""
import contextlib
import logging
import time

import torch
from tqdm.auto import tqdm

from minidu.kernels.gather import gather_rows
from minidu.kernels.kv_cache import allocate_kv_cache
from minidu.kernels.sampling import sample
from minidu.kernels.utils import device_num_sms
from minidu.models.config import ModelConfig
from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, Plan, ScheduledChunk, StepOutput
from minidu.step_inputs import DecodeInputs, StepInputs, build_decode_inputs, build_step_inputs

logger = logging.getLogger("minidu")

_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class Lane:
    """Where a part of a plan is launched: its own CUDA stream, or on the CPU the host, where interpreted kernels run
    synchronously, so the lanes of a multiplexed plan run one after the other."""

    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


def _mark(device: torch.device):
    """A point in the work launched so far on the current stream: a recorded CUDA event, or the host's time."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class ModelRunner:
    def __init__(self, model, config: ModelConfig, *, num_kv_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, dtype: torch.dtype, use_cuda_graph: bool,
                 decode_sms_choices: tuple[int, ...] = ()):
        self.model, self.config = model, config
        self.device, self.block_size = device, block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_caches = allocate_kv_cache(config.num_hidden_layers, num_kv_blocks, block_size,
                                           model.num_kv_heads, config.head_dim, dtype, device)
        self.num_sms = device_num_sms(device.index or 0) if device.type == "cuda" else None
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        self.graph_buckets = [b for b in _GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        # Aggregated decode steps run on every SM (None); split steps on one of the policy's decode budgets.
        budgets = [None] + [s for s in sorted(set(decode_sms_choices)) if self._budget(s) is not None]
        self.graph_keys = [(b, s) for s in budgets for b in self.graph_buckets]
        self.graphs: dict[tuple[int, int | None], "DecodeGraph"] = {}
        self.prefill_lane, self.decode_lane = Lane("prefill", device), Lane("decode", device)
        self.current_lane: str | None = None  # the lane work is being launched on (None: the main stream)
        self.graph_capture: dict | None = None  # graphs, seconds and bytes of the start-up capture
        if self.use_cuda_graph:
            self.graph_pool = torch.cuda.graph_pool_handle()  # decode graphs never replay at once: share memory
            self.capture_graphs()

    def clock(self) -> float:
        return time.perf_counter()

    def _budget(self, num_sms: int | None) -> int | None:
        """The graph key of an SM budget: None for the whole GPU, however it was asked for."""
        return None if num_sms is None or (self.num_sms is not None and num_sms >= self.num_sms) else num_sms

    def capture_graphs(self) -> None:
        """Captures every (batch bucket, decode budget) graph now, so that no step stops to capture one."""
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.perf_counter()
        for batch, budget in tqdm(self.graph_keys, desc="capturing decode graphs", unit="graph"):
            self.graphs[batch, budget] = DecodeGraph(self, batch, budget)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        self.graph_capture = {"graphs": len(self.graphs), "seconds": time.perf_counter() - start, "bytes": used}
        logger.info("captured %d decode graphs (%d batch buckets x budgets %s, 0 = all SMs) in %.1f s, using %.2f GiB",
                    len(self.graphs), len(self.graph_buckets), sorted({s or 0 for _, s in self.graph_keys}),
                    self.graph_capture["seconds"], used / 2**30)

    @contextlib.contextmanager
    def _on(self, lane: Lane):
        previous, self.current_lane = self.current_lane, lane.name
        try:
            with lane.context():
                yield
        finally:
            self.current_lane = previous

    # ---- one forward pass over a mixed batch ----

    def forward_and_sample(self, inputs: StepInputs, num_sms: int | None) -> torch.Tensor:
        """Runs the model on a flattened batch and samples one token for each of its sampling rows."""
        hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches, num_sms)
        if inputs.sample_rows is not None:
            hidden = gather_rows(inputs.sample_rows, hidden, num_sms=num_sms)
        logits = self.model.compute_logits(hidden, num_sms)
        s = inputs.sampling
        return sample(logits, s.temperatures, s.top_ks, s.top_ps, s.seeds, s.steps, num_sms=num_sms)

    def execute(self, plan: Plan) -> StepOutput:
        """Runs a plan; returns the sampled tokens of each sequence that samples, and when each was produced."""
        out = StepOutput()
        if isinstance(plan, AggregatedPlan):
            self._aggregated(out, plan.chunks, plan.num_sms)
        else:
            self._multiplexed(out, plan)
        return out

    def _aggregated(self, out: StepOutput, chunks: list[ScheduledChunk], num_sms: int | None) -> None:
        if not chunks:
            return
        if all(c.is_decode for c in chunks):
            self._collect_decode(out, chunks, *self._launch_decode(chunks, 1, num_sms))
            return
        inputs = build_step_inputs(chunks, self.block_size, self.device)
        tokens = self.forward_and_sample(inputs, num_sms).tolist()
        now = time.perf_counter()
        for seq_id, token in zip(inputs.sampling_seq_ids, tokens):
            out.add(seq_id, [token], [now])

    def _multiplexed(self, out: StepOutput, plan: MultiplexedPlan) -> None:
        """Prefill on `num_sms_prefill` SMs while k decode steps run on `num_sms_decode` others, each on its own lane
        (graphs or not); one sync at the end."""
        if self.device.type == "cuda":
            main = torch.cuda.current_stream()
            self.prefill_lane.stream.wait_stream(main)
            self.decode_lane.stream.wait_stream(main)
        decode = None
        if plan.decode:
            with self._on(self.decode_lane):
                decode = self._launch_decode(plan.decode, plan.k, plan.num_sms_decode)
        if plan.prefill:
            with self._on(self.prefill_lane):  # the inputs' copy must be ordered on this lane too
                inputs = build_step_inputs(plan.prefill, self.block_size, self.device)
                prefill_tokens = self.forward_and_sample(inputs, plan.num_sms_prefill)
                prefill_done = _mark(self.device)
        if self.device.type == "cuda":
            main.wait_stream(self.prefill_lane.stream)
            main.wait_stream(self.decode_lane.stream)
        end = _mark(self.device)
        if decode is not None:
            self._collect_decode(out, plan.decode, *decode, end)
        if plan.prefill:
            tokens = prefill_tokens.tolist()
            times = _event_times([prefill_done], end)
            for seq_id, token in zip(inputs.sampling_seq_ids, tokens):
                out.add(seq_id, [token], times)

    # ---- decode: k steps back to back, tokens fed forward on the device ----

    def _decode_inputs(self, chunks: list[ScheduledChunk], k: int) -> DecodeInputs:
        padded = self._bucket(len(chunks)) if self.use_cuda_graph else len(chunks)
        width = self.max_blocks_per_seq if self.use_cuda_graph else None
        return build_decode_inputs(chunks, k, padded, width, self.block_size, self.device)

    def _launch_decode(self, chunks: list[ScheduledChunk], k: int, num_sms: int | None) -> tuple[torch.Tensor, list]:
        """Launches k decode steps on the current stream without host synchronisation (graph replays, or eager
        forward passes); returns (tokens [k, B] on the device, a mark after each step)."""
        inputs = self._decode_inputs(chunks, k)
        if self.use_cuda_graph:
            return self._graph(self._bucket(len(chunks)), num_sms).run(inputs, k)
        input_ids, rows, marks = inputs.input_ids, [], []
        for i in range(k):
            input_ids = self.forward_and_sample(inputs.step(i, input_ids), num_sms)
            rows.append(input_ids)
            marks.append(_mark(self.device))
        return torch.stack(rows), marks

    def _collect_decode(self, out: StepOutput, chunks: list[ScheduledChunk], tokens: torch.Tensor, marks,
                        end=None) -> None:
        rows = tokens[:, :len(chunks)].T.tolist()
        times = _event_times(marks, end)
        for c, row in zip(chunks, rows):
            out.add(c.seq.seq_id, row, times)

    def _bucket(self, batch: int) -> int:
        return next(b for b in self.graph_buckets if b >= batch)

    def _graph(self, batch: int, num_sms: int | None) -> "DecodeGraph":
        key = (batch, self._budget(num_sms))
        if key not in self.graphs:
            budgets = sorted({s for _, s in self.graph_keys if s is not None})
            raise RuntimeError(f"no CUDA graph was captured for a decode batch of {batch} on {num_sms} SMs: graphs "
                               f"exist for the whole GPU and decode budgets {budgets} (decode_sms_choices); the "
                               f"policy chose a budget outside them")
        return self.graphs[key]


def _event_times(events: list, end=None) -> list[float]:
    """Host-clock times of marks: host times as they are; CUDA events from how long before `end` (default: the last
    of them) each fired, `end` itself taken to fire about when the host sees it."""
    if not events or isinstance(events[0], float):
        return list(events)
    end = end or events[-1]
    end.synchronize()
    now = time.perf_counter()
    return [now - e.elapsed_time(end) / 1e3 for e in events]


class DecodeGraph:
    """One captured decode step (forward, LM head, sampling) for a padded batch and an SM budget.

    Its inputs live in static buffers; `run` writes the metadata of all k steps in one copy, then for each step copies
    that step's row into the buffers and replays, feeding the sampled tokens to the next step on the device.
    """

    def __init__(self, runner: "ModelRunner", batch: int, num_sms: int | None):
        self.runner, self.batch = runner, batch
        blank = build_decode_inputs([], 1, batch, runner.max_blocks_per_seq, runner.block_size, runner.device)
        self.static = blank.step(0, blank.input_ids)
        stream = torch.cuda.Stream(runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            runner.forward_and_sample(self.static, num_sms)  # compiles kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner.graph_pool, stream=stream):
            self.tokens = runner.forward_and_sample(self.static, num_sms)

    def run(self, inputs: DecodeInputs, k: int) -> tuple[torch.Tensor, list]:
        out = torch.empty((k, self.batch), dtype=torch.int64, device=self.runner.device)
        events = []
        s = self.static
        s.input_ids.copy_(inputs.input_ids, non_blocking=True)
        for i in range(k):
            step = inputs.step(i, s.input_ids)
            for dst, src in ((s.positions, step.positions), (s.attn.slot_mapping, step.attn.slot_mapping),
                             (s.attn.decode_seq_lens, step.attn.decode_seq_lens),
                             (s.attn.decode_block_tables, step.attn.decode_block_tables),
                             (s.sampling.temperatures, step.sampling.temperatures),
                             (s.sampling.top_ks, step.sampling.top_ks), (s.sampling.top_ps, step.sampling.top_ps),
                             (s.sampling.seeds, step.sampling.seeds), (s.sampling.steps, step.sampling.steps)):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
            out[i].copy_(self.tokens, non_blocking=True)
            s.input_ids.copy_(self.tokens, non_blocking=True)
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        return out, events
