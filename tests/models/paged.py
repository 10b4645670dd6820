"""Drives CausalLM.forward over a paged KV cache the way an engine does: blocks drawn from a shuffled pool, flattened
batches of prefill chunks followed by one decode token per running request."""
import torch

from minidu.models import AttentionMetadata, CausalLM


class PagedRunner:
    def __init__(self, model: CausalLM, *, block_size: int = 4, num_blocks: int = 16, max_blocks: int = 4,
                 seed: int = 0, num_sms: int | None = None):
        c = model.config
        generator = torch.Generator().manual_seed(seed)
        self.model, self.block_size, self.max_blocks, self.num_sms = model, block_size, max_blocks, num_sms
        self.free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
        shape = (num_blocks, block_size, model.num_kv_heads, c.head_dim)  # this rank's kv heads
        # Large finite garbage in unwritten slots: any read past a sequence's end shows up in the logits.
        self.kv_caches = [tuple((100 * torch.randn(shape, generator=generator)).to(model.device, model.dtype)
                                for _ in range(2))
                          for _ in range(c.num_hidden_layers)]
        self.blocks: dict[str, list[int]] = {}
        self.num_cached: dict[str, int] = {}

    def _place(self, rid: str, num_new: int) -> tuple[list[int], list[int]]:
        """Positions and cache slots of `num_new` new tokens of request `rid`, allocating blocks as needed."""
        start = self.num_cached.get(rid, 0)
        blocks = self.blocks.setdefault(rid, [])
        while len(blocks) * self.block_size < start + num_new:
            blocks.append(self.free_blocks.pop())
        assert len(blocks) <= self.max_blocks
        self.num_cached[rid] = start + num_new
        positions = list(range(start, start + num_new))
        slots = [blocks[p // self.block_size] * self.block_size + p % self.block_size for p in positions]
        return positions, slots

    def _block_table(self, rids: list[str]) -> torch.Tensor:
        rows = [self.blocks[r] + [-1] * (self.max_blocks - len(self.blocks[r])) for r in rids]
        return torch.tensor(rows, dtype=torch.int32, device=self.model.device).reshape(len(rids), self.max_blocks)

    def step(self, prefill: list[tuple[str, list[int]]], decode: list[tuple[str, int]]
             ) -> tuple[torch.Tensor, list[tuple[str, int]]]:
        """Runs prefill chunks (request, new tokens) then decode tokens (request, token) as one batch.

        Returns logits [T, V] of every token and the (request, position) each logits row belongs to.
        """
        tokens, positions, slots, rows = [], [], [], []
        cu_seqlens, prefill_lens, decode_lens = [0], [], []
        for rid, new_tokens in prefill:
            pos, slot = self._place(rid, len(new_tokens))
            tokens += new_tokens
            positions += pos
            slots += slot
            rows += [(rid, p) for p in pos]
            cu_seqlens.append(cu_seqlens[-1] + len(new_tokens))
            prefill_lens.append(self.num_cached[rid])
        for rid, token in decode:
            pos, slot = self._place(rid, 1)
            tokens.append(token)
            positions += pos
            slots += slot
            rows.append((rid, pos[0]))
            decode_lens.append(self.num_cached[rid])
        int32 = dict(dtype=torch.int32, device=self.model.device)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, **int32),
            num_prefill_tokens=cu_seqlens[-1],
            cu_seqlens_q=torch.tensor(cu_seqlens, **int32),
            prefill_seq_lens=torch.tensor(prefill_lens, **int32),
            prefill_block_tables=self._block_table([rid for rid, _ in prefill]),
            decode_seq_lens=torch.tensor(decode_lens, **int32),
            decode_block_tables=self._block_table([rid for rid, _ in decode]),
        )
        ids, positions = (torch.tensor(x, device=self.model.device) for x in (tokens, positions))
        hidden = self.model.forward(ids, positions, attn, self.kv_caches,
                                    num_sms=self.num_sms)
        # Logits come back on the CPU, where the tests' references live.
        return self.model.compute_logits(hidden, num_sms=self.num_sms).cpu(), rows


def prefill_logits(model: CausalLM, tokens: list[int]) -> torch.Tensor:
    """The logits of one prompt run as a single prefill chunk."""
    logits, _ = PagedRunner(model, num_blocks=8).step([("r", tokens)], [])
    return logits
