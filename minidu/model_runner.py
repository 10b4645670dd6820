"""Carries out execution plans on the model: builds each step's metadata on the host, copies it to the device in one
transfer, runs the forward pass and samples. On CUDA, decode steps replay captured CUDA graphs, and a multiplexed plan
runs its prefill batch and its k look-ahead decode steps on two streams with disjoint SM budgets."""
import time

import torch

from minidu.kernels.embedding import embedding
from minidu.kernels.kv_cache import allocate_kv_cache
from minidu.kernels.sampling import sample
from minidu.models.config import ModelConfig
from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, Plan, ScheduledChunk, StepOutput
from minidu.step_inputs import DecodeInputs, StepInputs, build_decode_inputs, build_step_inputs

_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class ModelRunner:
    def __init__(self, model, config: ModelConfig, *, num_kv_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, dtype: torch.dtype, use_cuda_graph: bool):
        self.model, self.config = model, config
        self.device, self.block_size = device, block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_caches = allocate_kv_cache(config.num_hidden_layers, num_kv_blocks, block_size,
                                           config.num_key_value_heads, config.head_dim, dtype, device)
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        self.graph_buckets = [b for b in _GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.graphs: dict[tuple[int, int | None], "DecodeGraph"] = {}
        if self.use_cuda_graph:
            self.prefill_stream, self.decode_stream = torch.cuda.Stream(device), torch.cuda.Stream(device)
            self.graph_pool = torch.cuda.graph_pool_handle()  # decode graphs never replay at once: share memory

    def clock(self) -> float:
        return time.perf_counter()

    # ---- one forward pass over a mixed batch ----

    def forward_and_sample(self, inputs: StepInputs, num_sms: int | None) -> torch.Tensor:
        """Runs the model on a flattened batch and samples one token for each of its sampling rows."""
        hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches, num_sms)
        if inputs.sample_rows is not None:
            hidden = embedding(inputs.sample_rows, hidden, num_sms=num_sms)
        logits = self.model.compute_logits(hidden, num_sms)
        s = inputs.sampling
        return sample(logits, s.temperatures, s.top_ks, s.top_ps, s.seeds, s.steps, num_sms=num_sms)

    def execute(self, plan: Plan) -> StepOutput:
        """Runs a plan; returns the sampled tokens of each sequence that samples, and when each was produced."""
        out = StepOutput()
        if isinstance(plan, AggregatedPlan):
            self._aggregated(out, plan.chunks, plan.num_sms)
        elif not self.use_cuda_graph:
            if plan.decode:
                self._decode_eager(out, plan.decode, plan.k, plan.num_sms_decode)
            self._aggregated(out, plan.prefill, plan.num_sms_prefill)
        else:
            self._multiplexed(out, plan)
        return out

    def _aggregated(self, out: StepOutput, chunks: list[ScheduledChunk], num_sms: int | None) -> None:
        if not chunks:
            return
        if all(c.is_decode for c in chunks):
            if self.use_cuda_graph:
                self._collect_graph(out, chunks, *self._launch_graph(chunks, 1, num_sms, torch.cuda.current_stream()))
            else:
                self._decode_eager(out, chunks, 1, num_sms)
            return
        inputs = build_step_inputs(chunks, self.block_size, self.device)
        tokens = self.forward_and_sample(inputs, num_sms).tolist()
        now = time.perf_counter()
        for seq_id, token in zip(inputs.sampling_seq_ids, tokens):
            out.add(seq_id, [token], [now])

    def _multiplexed(self, out: StepOutput, plan: MultiplexedPlan) -> None:
        """Prefill on `num_sms_prefill` SMs while k decode steps run on `num_sms_decode` others; one sync at the end."""
        main = torch.cuda.current_stream()
        self.prefill_stream.wait_stream(main)
        self.decode_stream.wait_stream(main)
        decode = self._launch_graph(plan.decode, plan.k, plan.num_sms_decode, self.decode_stream) if plan.decode else None
        if plan.prefill:
            with torch.cuda.stream(self.prefill_stream):  # the inputs' copy must be ordered on this stream too
                inputs = build_step_inputs(plan.prefill, self.block_size, self.device)
                prefill_tokens = self.forward_and_sample(inputs, plan.num_sms_prefill)
                prefill_done = torch.cuda.Event(enable_timing=True)
                prefill_done.record()
        main.wait_stream(self.prefill_stream)
        main.wait_stream(self.decode_stream)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        if decode is not None:
            self._collect_graph(out, plan.decode, *decode, end)
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

    def _decode_eager(self, out: StepOutput, chunks: list[ScheduledChunk], k: int, num_sms: int | None) -> None:
        """k decode steps, each step's tokens fed to the next on the device (interpreted runs are synchronous)."""
        inputs = self._decode_inputs(chunks, k)
        input_ids, rows, times = inputs.input_ids, [], []
        for i in range(k):
            input_ids = self.forward_and_sample(inputs.step(i, input_ids), num_sms)
            rows.append(input_ids)
            times.append(time.perf_counter())
        tokens = torch.stack(rows).T.tolist()
        for c, row in zip(chunks, tokens):
            out.add(c.seq.seq_id, row, times)

    def _launch_graph(self, chunks: list[ScheduledChunk], k: int, num_sms: int | None, stream):
        """Launches k graph replays without host synchronisation; returns (tokens [k, B] on device, step events)."""
        graph = self._graph(self._bucket(len(chunks)), num_sms)
        with torch.cuda.stream(stream):
            return graph.run(self._decode_inputs(chunks, k), k)

    def _collect_graph(self, out: StepOutput, chunks: list[ScheduledChunk], tokens: torch.Tensor, events,
                       end=None) -> None:
        rows = tokens[:, :len(chunks)].T.tolist()
        times = _event_times(events, end)
        for c, row in zip(chunks, rows):
            out.add(c.seq.seq_id, row, times)

    def _bucket(self, batch: int) -> int:
        return next(b for b in self.graph_buckets if b >= batch)

    def _graph(self, batch: int, num_sms: int | None) -> "DecodeGraph":
        key = (batch, num_sms)
        if key not in self.graphs:
            self.graphs[key] = DecodeGraph(self, batch, num_sms)
        return self.graphs[key]


def _event_times(events: list, end=None) -> list[float]:
    """Host-clock times of recorded CUDA events, from how long before `end` (default: the last of them) each fired;
    `end` itself is taken to fire about when the host sees it."""
    end = end or events[-1]
    end.synchronize()
    now = time.perf_counter()
    return [now - e.elapsed_time(end) / 1e3 for e in events]


class DecodeGraph:
    """One captured decode step (forward, LM head, sampling) for a padded batch and an SM budget.

    Its inputs live in static buffers; `run` writes the metadata of all k steps in one copy, then for each step copies
    that step's row into the buffers and replays, feeding the sampled tokens to the next step on the device.
    """

    def __init__(self, runner: ModelRunner, batch: int, num_sms: int | None):
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
