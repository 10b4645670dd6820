"""Shared pieces of the scheduler tests."""
from minidu.scheduler.scheduler import Scheduler


def state(scheduler: Scheduler) -> tuple:
    """Everything a proposal must leave untouched."""
    bm = scheduler.block_manager
    seqs = [*scheduler.waiting, *scheduler.running]
    return ([s.request_id for s in scheduler.waiting], [s.request_id for s in scheduler.running],
            [(s.status, s.num_computed_tokens, tuple(s.block_table)) for s in seqs], list(bm.free_blocks),
            [(b.ref_count, b.hash) for b in bm.blocks], dict(bm.hash_to_block), scheduler.num_preemptions)
