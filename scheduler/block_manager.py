"""Paged KV-cache bookkeeping: reference-counted blocks and prefix caching by chained block hashes.

A full block's hash covers its tokens and, through the previous block's hash, every token before it, so equal hashes
mean equal prefixes. Freed blocks keep their hash until reused, so a later request (or a preempted one coming back)
with the same prefix picks them up again without recomputing.
"""
from collections import OrderedDict
from dataclasses import dataclass, field

from minidu.scheduler.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def block_hash(token_ids: tuple[int, ...], prev_hash: int | None) -> int:
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def allocate_prefix(self, seq: Sequence) -> None:
        """Admits a waiting sequence: takes cached blocks for the longest hashed prefix of its tokens.

        The last token is never taken from the cache, because the step that computes it produces the next token's logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block_id in list(self._cached_blocks(seq)):
            self._ref(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_cached_prompt_tokens = seq.num_computed_tokens

    def prefix_hit(self, seq: Sequence) -> tuple[int, int]:
        """What `allocate_prefix` would find, changing nothing: (cached tokens, how many of their blocks now sit in the
        free list and would leave it)."""
        num_blocks, num_reused = 0, 0
        for block_id in self._cached_blocks(seq):
            num_blocks += 1
            num_reused += self.blocks[block_id].ref_count == 0
        return num_blocks * self.block_size, num_reused

    def num_freed_by(self, seq: Sequence) -> int:
        """Blocks that freeing `seq` would return to the free list (those no other request references)."""
        return sum(self.blocks[b].ref_count == 1 for b in seq.block_table)

    def _cached_blocks(self, seq: Sequence):
        """The cached blocks holding the longest hashed prefix of `seq`'s tokens but its last one (the step that
        computes the last token produces the next token's logits)."""
        if not self.enable_prefix_caching:
            return
        prev_hash = None
        for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(seq.token_ids[start:start + self.block_size])
            prev_hash = block_hash(tokens, prev_hash)
            block_id = self.hash_to_block.get(prev_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                return
            yield block_id

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Makes room in `seq`'s blocks for its next `num_new_tokens` tokens."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        assert needed <= self.num_free_blocks, "caller must check can_append"
        seq.block_table.extend(self._take_free_block() for _ in range(max(0, needed)))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the hashes of `seq`'s blocks whose KV has been fully computed."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        first = num_full  # hashed blocks form a prefix of the table; find where it ends
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1
        prev_hash = self.blocks[seq.block_table[first - 1]].hash if first else None
        for i in range(first, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.token_ids = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                block.hash = block_hash(block.token_ids, prev_hash)
                self.hash_to_block.setdefault(block.hash, block.block_id)
            prev_hash = block.hash

    def free(self, seq: Sequence) -> None:
        """Releases `seq`'s blocks; blocks nobody references go to the back of the free list with their hash kept."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0
