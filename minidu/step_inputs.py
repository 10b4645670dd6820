"""Step metadata built on the host from scheduled chunks (token ids, positions, slot_mapping, cu_seqlens, block_tables,
sampling parameters) and copied to the device in a single transfer."""
from dataclasses import dataclass

import numpy as np
import torch

from minidu.models.attention import AttentionMetadata
from minidu.scheduler.plan import ScheduledChunk


@dataclass(slots=True)
class SamplingTensors:
    temperatures: torch.Tensor  # [B] float32
    top_ks: torch.Tensor  # [B] int32
    top_ps: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, index of the output token being sampled


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    sample_rows: torch.Tensor | None  # [B] int32 rows of the hidden states to sample from; None: every row
    sampling: SamplingTensors
    sampling_seq_ids: list[int]


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Packs host arrays into one byte buffer, copies it once, and returns typed views on the device."""
    offsets, total = {}, 0
    for name, a in arrays.items():
        offsets[name] = total
        total += -(-a.nbytes // 8) * 8  # keep every view 8-byte aligned
    buf = np.zeros(total, dtype=np.uint8)
    for name, a in arrays.items():
        buf[offsets[name]:offsets[name] + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    host = torch.from_numpy(buf)
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    return {name: dev[offsets[name]:offsets[name] + a.nbytes].view(_TORCH[a.dtype]).view(a.shape)
            for name, a in arrays.items()}


_TORCH = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


def _slots(chunk_table: list[int], positions: np.ndarray, block_size: int) -> np.ndarray:
    table = np.asarray(chunk_table, dtype=np.int64)
    return (table[positions // block_size] * block_size + positions % block_size).astype(np.int32)


def _tables(chunks: list[ScheduledChunk], rows: int, width: int | None) -> np.ndarray:
    width = width or max([len(c.seq.block_table) for c in chunks] + [1])
    out = np.zeros((rows, width), dtype=np.int32)
    for i, c in enumerate(chunks):
        out[i, :len(c.seq.block_table)] = c.seq.block_table
    return out


def _sampling(chunks: list[ScheduledChunk], rows: int) -> dict[str, np.ndarray]:
    """Per-row sampling parameters; padding rows are greedy."""
    out = {"temperatures": np.zeros(rows, np.float32), "top_ks": np.zeros(rows, np.int32),
           "top_ps": np.ones(rows, np.float32), "seeds": np.zeros(rows, np.int64), "steps": np.zeros(rows, np.int64)}
    for i, c in enumerate(chunks):
        p = c.seq.params
        out["temperatures"][i], out["top_ks"][i], out["top_ps"][i] = p.temperature, p.top_k, p.top_p
        out["seeds"][i], out["steps"][i] = c.seq.seed, c.seq.num_output_tokens
    return out


def _sampling_tensors(t: dict[str, torch.Tensor]) -> SamplingTensors:
    return SamplingTensors(t["temperatures"], t["top_ks"], t["top_ps"], t["seeds"], t["steps"])


def build_step_inputs(chunks: list[ScheduledChunk], block_size: int, device: torch.device) -> StepInputs:
    """A mixed batch: prefill/extend chunks first, then decode tokens (the layout AttentionMetadata expects)."""
    prefill = [c for c in chunks if not c.is_decode]
    decode = [c for c in chunks if c.is_decode]
    ordered = prefill + decode
    positions = [np.arange(c.start, c.start + c.num_new_tokens) for c in ordered]
    lens = np.array([c.num_new_tokens for c in ordered], dtype=np.int64)
    ends = np.cumsum(lens)
    samplers = [i for i, c in enumerate(ordered) if c.samples]
    arrays = {
        "input_ids": np.concatenate([np.asarray(c.seq.token_ids[c.start:c.start + c.num_new_tokens], np.int64)
                                     for c in ordered]),
        "positions": np.concatenate(positions).astype(np.int64),
        "slot_mapping": np.concatenate([_slots(c.seq.block_table, p, block_size) for c, p in zip(ordered, positions)]),
        "cu_seqlens_q": np.concatenate([[0], ends[:len(prefill)]]).astype(np.int32),
        "prefill_seq_lens": np.array([c.start + c.num_new_tokens for c in prefill], np.int32),
        "prefill_block_tables": _tables(prefill, len(prefill), None),
        "decode_seq_lens": np.array([c.start + 1 for c in decode], np.int32),
        "decode_block_tables": _tables(decode, len(decode), None),
        "sample_rows": (ends[samplers] - 1).astype(np.int32),
        **_sampling([ordered[i] for i in samplers], len(samplers)),
    }
    t = to_device(arrays, device)
    attn = AttentionMetadata(t["slot_mapping"], int(ends[len(prefill) - 1]) if prefill else 0, t["cu_seqlens_q"],
                             t["prefill_seq_lens"], t["prefill_block_tables"], t["decode_seq_lens"],
                             t["decode_block_tables"])
    every_row = len(samplers) == len(ordered) == int(ends[-1])
    return StepInputs(t["input_ids"], t["positions"], attn, None if every_row else t["sample_rows"],
                      _sampling_tensors(t), [ordered[i].seq.seq_id for i in samplers])


@dataclass(slots=True)
class DecodeInputs:
    """Metadata of k consecutive decode steps of one batch (padded to `batch` rows), written before any of them runs."""

    batch: int
    input_ids: torch.Tensor  # [B] int64, each request's last token
    positions: torch.Tensor  # [k, B] int64
    slot_mapping: torch.Tensor  # [k, B] int32, -1 on padding rows
    seq_lens: torch.Tensor  # [k, B] int32, 0 on padding rows
    steps: torch.Tensor  # [k, B] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    sampling: SamplingTensors  # its `steps` field is the [k, B] table; step(i) picks row i

    def step(self, i: int, input_ids: torch.Tensor) -> StepInputs:
        empty = self.slot_mapping[i, :0]
        attn = AttentionMetadata(self.slot_mapping[i], 0, empty, empty, self.block_tables[:0], self.seq_lens[i],
                                 self.block_tables)
        s = self.sampling
        sampling = SamplingTensors(s.temperatures, s.top_ks, s.top_ps, s.seeds, self.steps[i])
        return StepInputs(input_ids, self.positions[i], attn, None, sampling, [])


def build_decode_inputs(chunks: list[ScheduledChunk], k: int, batch: int, table_width: int | None,
                        block_size: int, device: torch.device) -> DecodeInputs:
    """k look-ahead steps for decode chunks whose blocks already hold room for k new tokens."""
    assert len(chunks) <= batch and k >= 1
    positions = np.zeros((k, batch), np.int64)
    slots = np.full((k, batch), -1, np.int32)
    seq_lens = np.zeros((k, batch), np.int32)
    steps = np.zeros((k, batch), np.int64)
    for b, c in enumerate(chunks):
        pos = np.arange(c.start, c.start + k)
        positions[:, b], seq_lens[:, b] = pos, pos + 1
        slots[:, b] = _slots(c.seq.block_table, pos, block_size)
        steps[:, b] = c.seq.num_output_tokens + np.arange(k)
    input_ids = np.zeros(batch, np.int64)
    input_ids[:len(chunks)] = [c.seq.token_ids[c.start] for c in chunks]
    sampling = _sampling(chunks, batch)
    t = to_device({**sampling, "input_ids": input_ids, "positions": positions, "slot_mapping": slots,
                   "seq_lens": seq_lens, "steps": steps, "block_tables": _tables(chunks, batch, table_width)}, device)
    return DecodeInputs(batch, t["input_ids"], t["positions"], t["slot_mapping"], t["seq_lens"], t["steps"],
                        t["block_tables"], _sampling_tensors(t))
