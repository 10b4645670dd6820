"""Continuous batching with stall-free chunked prefill (Sarathi-Serve): running decodes first, then prefill chunks up to
the token budget, FCFS; when KV blocks run out the newest running request is preempted and later recomputed.

Each step the scheduler proposes what could run (`propose`, no state changes), a policy chooses a plan from the
proposal, and the scheduler commits exactly that plan (`commit`: admission, preemption, KV slots); executors (GPU or
simulated) run it and hand the sampled tokens back to `postprocess`.
"""
import dataclasses
from collections import deque
from dataclasses import dataclass

from minidu.scheduler.block_manager import BlockManager
from minidu.scheduler.plan import MultiplexedPlan, Plan, Proposal, ScheduledChunk, StepOutput, plan_chunks
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

    def propose(self, decodes: bool = True, prefills: bool = True) -> Proposal:
        """What could run next, changing nothing: every running decode, then prefill chunks (running requests', then
        waiting requests' in FCFS order) within `max_num_batched_tokens`, the seq limit and the KV pool. Where blocks
        run short the newest running requests make room: one that is not reached before the older ones is evicted
        lazily by `commit` (only if a chosen chunk needs its blocks); one that cannot fit itself is in `preempt`.
        `decodes=False` or `prefills=False` leaves that kind of work out (prefill-first scheduling)."""
        bm = self.block_manager
        budget, free = self.config.max_num_batched_tokens, bm.num_free_blocks
        chunks: list[ScheduledChunk] = []
        preempt: list[Sequence] = []
        queue = [s for s in self.running if s.num_uncomputed_tokens == 1] if decodes else []
        if prefills:
            queue += [s for s in self.running if s.num_uncomputed_tokens > 1]
        num_running = len(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_uncomputed_tokens, budget)
            need = bm.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table)
            while need > free:
                victim = max([*queue, seq], key=lambda s: s.seq_id)
                free += bm.num_freed_by(victim)
                num_running -= 1
                if victim is seq:
                    preempt.append(seq)
                    break
                queue.remove(victim)
            if need <= free and seq not in preempt:
                free -= need
                chunks.append(ScheduledChunk.of(seq, seq.num_computed_tokens, n))
                budget -= n
        for seq in self.waiting if prefills else ():
            if budget == 0 or num_running >= self.config.max_num_seqs:
                break
            cached, reused = bm.prefix_hit(seq)
            n = min(seq.num_tokens - cached, budget)
            need = reused + bm.blocks_needed(cached + n) - cached // bm.block_size
            if need > free:
                break
            free -= need
            chunks.append(ScheduledChunk.of(seq, cached, n))
            budget -= n
            num_running += 1
        return Proposal(chunks, tuple(preempt))

    def commit(self, plan: Plan) -> Plan:
        """Makes `plan` (chosen from this step's `propose`, possibly fewer or truncated chunks) happen: admits its
        waiting requests first (so their prefix-cache hits are taken before any block is reused), preempts what the
        proposal said must go, evicts the newest running requests outside the plan where blocks still run short, and
        allocates the plan's slots and look-ahead slots. Returns the plan as committed (a multiplexed plan's k may
        shrink to what the requests and the KV pool allow)."""
        chunks = plan_chunks(plan)
        for chunk in chunks:
            seq = chunk.seq
            if seq.status is SequenceStatus.WAITING:
                self.block_manager.allocate_prefix(seq)
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            assert seq.num_computed_tokens == chunk.start, "a plan must come from this step's proposal"
        for seq in plan.preempt:
            self.preempt(seq)
        chosen = {c.seq.seq_id for c in chunks}
        for chunk in chunks:
            self._make_room(chunk.seq, chunk.num_new_tokens, chosen)
            self.block_manager.append_slots(chunk.seq, chunk.num_new_tokens)
        if isinstance(plan, MultiplexedPlan) and plan.decode:
            k = self.reserve_lookahead(plan.decode, plan.k)
            if k != plan.k:
                plan = dataclasses.replace(plan, k=k)
        return plan

    def _make_room(self, seq: Sequence, n: int, chosen: set[int]) -> None:
        """Preempts the newest running requests outside the plan until `seq` has room for `n` more tokens."""
        while not self.block_manager.can_append(seq, n):
            victims = [s for s in self.running if s.seq_id not in chosen]
            assert victims, "the proposal only holds chunks that fit"
            self.preempt(max(victims, key=lambda s: s.seq_id))

    def preempt(self, seq: Sequence) -> None:
        """Frees `seq`'s blocks and puts it first in line; its tokens so far are recomputed when it is readmitted."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def reserve_lookahead(self, decode: list[ScheduledChunk], k: int) -> int:
        """Gives committed decode chunks room for k tokens' KV, so k decode steps run without the host in between;
        returns the k reserved: at most what the longest-running request can still generate (the others drop their
        tokens past their end), what fits in max_model_len for all of them, and what the KV pool can hold."""
        assert k >= 1 and all(c.is_decode for c in decode)
        bm = self.block_manager
        k = min(k, max(c.seq.max_tokens - c.seq.num_output_tokens for c in decode),
                *(self.config.max_model_len - c.seq.num_tokens + 1 for c in decode))
        while k > 1 and sum(bm.blocks_needed(c.start + k) - len(c.seq.block_table) for c in decode) > bm.num_free_blocks:
            k -= 1
        for c in decode:
            bm.append_slots(c.seq, k)
        return k

    def postprocess(self, plan: Plan, output: StepOutput) -> list[tuple[Sequence, list[int], list[float]]]:
        """Applies a finished step: advances computed-token counts, appends sampled tokens, finishes and frees requests.

        Returns each advanced sequence with the tokens it kept this step and their times (empty for mid-prompt
        chunks); look-ahead tokens after a stop are dropped.
        """
        updates = []
        for chunk in plan_chunks(plan):
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
