"""Kernel shapes of the preset models, shared by the tile-table and ahead-of-time compile tests."""
from dataclasses import dataclass

from minidu.models.presets import MODEL_PRESETS


@dataclass(frozen=True, slots=True)
class PresetShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def projections(self) -> set[tuple[int, int]]:
        """(N, K) of every linear layer: qkv, o, gate_up, down, lm_head."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {(q + 2 * kv, self.hidden), (self.hidden, q), (2 * self.intermediate, self.hidden),
                (self.hidden, self.intermediate), (self.vocab, self.hidden)}


def preset_shapes() -> list[PresetShape]:
    return [PresetShape(name, c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                        c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]), c["intermediate_size"],
                        c["vocab_size"]) for name, c in MODEL_PRESETS.items()]
