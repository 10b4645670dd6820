"""Continuous batching with stall-free chunked prefill (Sarathi-Serve): running decodes first, then prefill chunks up to
the token budget, FCFS; when KV blocks run out the newest running request is preempted and later recomputed.

The scheduler decides which requests advance and by how many tokens; executors (GPU or simulated) run its plans and
hand the sampled tokens back to `postprocess`.
"""
from collections import deque
from dataclasses import dataclass

from minidu.scheduler.block_manager import BlockManager
from minidu.scheduler.plan import AggregatedPlan, Plan, ScheduledChunk, StepOutput
from minidu.scheduler.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}) so that every running decode fits in a step")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        capacity = block_manager.num_blocks * block_manager.block_size
        assert config.max_model_len <= capacity, "one request of max_model_len tokens must fit in the KV cache"
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert seq.num_tokens < self.config.max_model_len, "the engine rejects prompts that leave no room to generate"
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in [*self.waiting, *self.running]:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def schedule(self, decodes: bool = True, prefills: bool = True) -> AggregatedPlan:
        """The aggregated step: every running decode, then prefill chunks filling `max_num_batched_tokens`.

        `decodes=False` or `prefills=False` leaves that kind of work out (prefill-first scheduling uses both).
        """
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        queue = [s for s in self.running if s.num_uncomputed_tokens == 1] if decodes else []
        if prefills:
            queue += [s for s in self.running if s.num_uncomputed_tokens > 1]
        while queue:
            seq = queue.pop(0)
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                continue
            if self._make_room(seq, n, queue):
                chunks.append(self._take(seq, n))
                budget -= n
        while prefills and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.allocate_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_append(seq, n):
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._take(seq, n))
            budget -= n
        return AggregatedPlan(chunks)

    def _take(self, seq: Sequence, n: int) -> ScheduledChunk:
        chunk = ScheduledChunk(seq, seq.num_computed_tokens, n)
        self.block_manager.append_slots(seq, n)
        return chunk

    def _make_room(self, seq: Sequence, n: int, queue: list[Sequence]) -> bool:
        """Preempts the newest unscheduled running requests until `seq` has room for `n` more tokens; False when `seq`
        itself was the newest and got preempted."""
        while not self.block_manager.can_append(seq, n):
            victim = max([*queue, seq], key=lambda s: s.seq_id)
            self.preempt(victim)
            if victim is seq:
                return False
            queue.remove(victim)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Frees `seq`'s blocks and puts it first in line; its tokens so far are recomputed when it is readmitted."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def reserve_lookahead(self, chunk: ScheduledChunk, k: int) -> None:
        """Gives a decode chunk room for k tokens' KV so k decode steps can run without the host in between."""
        assert chunk.is_decode and k >= 1
        self.block_manager.append_slots(chunk.seq, k)

    def postprocess(self, plan: Plan, output: StepOutput) -> list[tuple[Sequence, list[int], list[float]]]:
        """Applies a finished step: advances computed-token counts, appends sampled tokens, finishes and frees requests.

        Returns each advanced sequence with the tokens it kept this step and their times (empty for mid-prompt
        chunks); look-ahead tokens after a stop are dropped.
        """
        chunks = plan.chunks if isinstance(plan, AggregatedPlan) else [*plan.prefill, *plan.decode]
        updates = []
        for chunk in chunks:
            seq = chunk.seq
            new_tokens = []
            for token in output.tokens.get(seq.seq_id, []) if chunk.samples else []:
                seq.token_ids.append(token)
                new_tokens.append(token)
                reason = self._finish_reason(seq, token)
                if reason:
                    seq.finish_reason = reason
                    break
            seq.num_computed_tokens = chunk.start + chunk.num_new_tokens + max(0, len(new_tokens) - 1)
            self.block_manager.cache_full_blocks(seq)
            if seq.finish_reason:
                self.finish(seq, seq.finish_reason)
            updates.append((seq, new_tokens, output.times.get(seq.seq_id, [])[:len(new_tokens)]))
        return updates

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None
