"""Megatron tensor parallelism of CausalLM: 2 and 3 gloo ranks (spawned processes) give the single-process model's
logits and greedy tokens on tiny safetensors and GGUF checkpoints; shards reassemble into the whole model, GGUF shards
dequantize only their own blocks, and sizes the model cannot be split by are refused by name."""
import pytest
import torch

import minidu.models.gguf_loader as gguf_loader
from minidu.models import CausalLM, ModelConfig
from minidu.models.loader import build_model
from minidu.models.parallel import RankLayout, Shard, TensorParallel
from minidu.scheduler.roofline import ModelShape
from tests.models.checkpoints import tiny_config, write_checkpoint
from tests.models.ranks import RankPool, generate_on_rank, load_config

# fp32 kernels; the ranks' partial sums are added in another order: |error| <= 1e-4 * max|logit| (as test_llama).
FP32_RTOL = 1e-4
_SIX_HEADS = dict(num_attention_heads=6, head_dim=16)
# name -> (architecture or "gguf", config overrides, tensor-parallel sizes)
CASES = {
    # One kv head, replicated on every rank; tied embeddings with 128 / 3 padded vocabulary shards; o/MLP biases.
    "llama-kv1-tied-biases": ("LlamaForCausalLM", dict(_SIX_HEADS, num_key_value_heads=1, tie_word_embeddings=True,
                                                       attention_bias=True, mlp_bias=True), (2, 3)),
    "qwen2-qkvbias-kv3": ("Qwen2ForCausalLM", dict(_SIX_HEADS, num_key_value_heads=3), (3,)),
    "qwen3-qknorm-kv2": ("Qwen3ForCausalLM", dict(num_attention_heads=6, num_key_value_heads=2, head_dim=32), (2,)),
    "gguf-llama-q8_0": ("gguf", {}, (2,)),
}


def _write_gguf(path):
    gguf_files = pytest.importorskip("tests.models.gguf_files")
    head_dim = gguf_files.HIDDEN // gguf_files.HEADS
    state = gguf_files.tiny_hf_state("llama", head_dim, tied=False)
    return gguf_files.write_gguf(path / "tiny-q8_0.gguf", "llama", state, gguf_files.Q.Q8_0, head_dim)


@pytest.fixture(scope="module")
def pool():
    with RankPool(3) as ranks:
        yield ranks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint path, its config, prompts, the single-process logits and greedy tokens)."""
    out = {}
    for name, (arch, overrides, _) in CASES.items():
        path = tmp_path_factory.mktemp(name)
        if arch == "gguf":
            path = _write_gguf(path)
        else:
            write_checkpoint(path, arch, seed=3, **overrides)
        config = load_config(path)
        generator = torch.Generator().manual_seed(4)
        prompts = {rid: torch.randint(0, config.vocab_size, (n,), generator=generator).tolist()
                   for rid, n in (("a", 5), ("b", 7))}
        out[name] = path, config, prompts, generate_on_rank(TensorParallel(), path, config, prompts)
    return out


@pytest.mark.parametrize("name, size", [(name, size) for name, (_, _, sizes) in CASES.items() for size in sizes])
def test_ranks_match_the_single_process_model(pool, checkpoints, name, size):
    path, config, prompts, (ref_logits, ref_tokens) = checkpoints[name]
    results = pool.run(generate_on_rank, size, path, config, prompts)
    assert len(results) == size
    for rank, (logits, tokens) in enumerate(results):
        assert tokens == ref_tokens, f"rank {rank}"
        assert logits.keys() == ref_logits.keys()
        for key, ref in ref_logits.items():
            assert logits[key].shape == (config.vocab_size,)
            # Every rank holds the same gathered logits, bit for bit, so every rank samples the same token.
            assert torch.equal(logits[key], results[0][0][key]), (rank, key)
            torch.testing.assert_close(logits[key], ref, rtol=0, atol=FP32_RTOL * ref.abs().max().item(),
                                       msg=lambda m: f"rank {rank} {key}: {m}")


def _fake_tp(rank: int, size: int) -> TensorParallel:
    # Building and loading a shard runs no collective, so no process group is needed.
    return TensorParallel(rank, size, group=object())


def _reassemble(models: list[CausalLM], name: str) -> torch.Tensor:
    """The whole checkpoint tensor `name` from the ranks' shards (replicated shards taken once)."""
    parts = {}
    for model in models:
        target, shard = model.weight_targets()[name]
        if shard.dim is None:
            return target
        parts.setdefault(shard.start, (shard.dim, target))
    dim = next(iter(parts.values()))[0]
    return torch.cat([target for _, (_, target) in sorted(parts.items())], dim=dim)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_shards_reassemble_into_the_single_process_weights(tmp_path, size, load_format):
    write_checkpoint(tmp_path, "LlamaForCausalLM", seed=1, **CASES["llama-kv1-tied-biases"][1])
    config = ModelConfig.from_pretrained(tmp_path)
    kwargs = dict(dtype=torch.float32, device="cpu", load_format=load_format, seed=9)
    whole = build_model(tmp_path, config, **kwargs)
    models = [build_model(tmp_path, config, **kwargs, tp=_fake_tp(rank, size)) for rank in range(size)]
    assert [m.num_kv_heads for m in models] == [1] * size
    for name, (target, _) in whole.weight_targets().items():
        assert torch.equal(_reassemble(models, name), target), name
    # Replicated kv heads: every rank holds the one k head.
    k_name = "model.layers.0.self_attn.k_proj.weight"
    assert all(torch.equal(m.weight_targets()[k_name][0], whole.weight_targets()[k_name][0]) for m in models)


@pytest.mark.parametrize("qtype_name, shard, whole_read", [
    ("Q8_0", Shard((128, 64), 0, 32, 96), False),  # rows: only their quant blocks
    ("Q8_0", Shard((128, 64), 1, 32, 64), False),  # columns on a 32-wide block boundary
    ("Q8_0", Shard((128, 64), 1, 21, 42), True),  # columns splitting a block: dequantize whole, then slice
    ("F16", Shard((128, 64), 1, 21, 42), False),
])
def test_gguf_shard_reads_only_its_blocks(tmp_path, monkeypatch, qtype_name, shard, whole_read):
    gguf_files = pytest.importorskip("tests.models.gguf_files")
    qtype = gguf_files.Q[qtype_name]
    state = gguf_files.tiny_hf_state("qwen3", 16, tied=True)
    path = gguf_files.write_gguf(tmp_path / "m.gguf", "qwen3", state, qtype, 16)
    full = dict(gguf_loader.read_gguf(path)[1])["model.layers.0.mlp.gate_proj.weight"]
    whole_reads = []
    dequantize = gguf_loader._dequantize
    monkeypatch.setattr(gguf_loader, "_dequantize", lambda t: whole_reads.append(t.name) or dequantize(t))
    tensor = dict(gguf_loader.read_gguf_shards(path)[1])["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(tensor.read(shard), full[shard.index()])
    assert whole_reads == (["blk.0.ffn_gate.weight"] if whole_read else [])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_shards_reassemble_into_the_whole_tensors(tmp_path, arch):
    """llama q/k shards are unpermuted per head; qwen2's 1-D q/k/v biases are sliced like their weights."""
    gguf_files = pytest.importorskip("tests.models.gguf_files")
    head_dim = gguf_files.HIDDEN // gguf_files.HEADS
    state = gguf_files.tiny_hf_state(arch, head_dim, tied=False)
    path = gguf_files.write_gguf(tmp_path / f"{arch}.gguf", arch, state, gguf_files.Q.Q8_0, head_dim)
    config = load_config(path)
    whole = build_model(path, config, dtype=torch.float32, device="cpu")
    models = [build_model(path, config, dtype=torch.float32, device="cpu", tp=_fake_tp(r, 2)) for r in range(2)]
    for name, (target, _) in whole.weight_targets().items():
        assert torch.equal(_reassemble(models, name), target), name


@pytest.mark.parametrize("overrides, size, message", [
    (dict(), 3, r"tensor_parallel_size=3 must divide num_attention_heads \(4\)"),
    (dict(intermediate_size=90), 4, r"tensor_parallel_size=4 must divide intermediate_size \(90\)"),
    (dict(num_attention_heads=12, num_key_value_heads=4, head_dim=16), 3,
     r"tensor_parallel_size=3 must divide num_key_value_heads \(4\) or be a multiple of it"),
    (dict(num_attention_heads=6, num_key_value_heads=2, head_dim=16), 3,
     r"tensor_parallel_size=3 must divide num_key_value_heads \(2\) or be a multiple of it"),
])
def test_sizes_that_cannot_split_the_model_are_refused(overrides, size, message):
    config = ModelConfig.from_hf_dict(tiny_config("LlamaForCausalLM", **overrides))
    with pytest.raises(ValueError, match=message):
        build_model(None, config, dtype=torch.float32, device="cpu", load_format="dummy", tp=_fake_tp(0, size))


def test_a_checkpoint_tensor_of_the_wrong_full_shape_is_refused_on_every_rank(tmp_path):
    # A q_proj of 5 heads instead of 6: rank 0's slice would have the right shape, so the full shape is checked.
    config = ModelConfig.from_hf_dict(tiny_config("LlamaForCausalLM", **_SIX_HEADS, num_key_value_heads=1))
    model = CausalLM(config, torch.float32, "cpu", _fake_tp(0, 2))
    named = {name: torch.zeros(shard.full_shape) for name, (_, shard) in model.weight_targets().items()}
    named["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5 * 16, 64)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(80, 64\), "
                                         r"expected \(96, 64\)"):
        model.load_state_dict(named.items())
    named["model.layers.0.self_attn.q_proj.weight"] = torch.full((96, 64), float("nan"))
    with pytest.raises(ValueError, match="holds NaN"):
        CausalLM(config, torch.float32, "cpu", _fake_tp(1, 2)).load_state_dict(named.items())


@pytest.mark.parametrize("heads, kv_heads, inter, vocab", [(4, 2, 96, 128), (8, 8, 64, 100), (12, 1, 48, 7)])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_rank_layout_agrees_with_the_latency_model(heads, kv_heads, inter, vocab, size):
    """The roofline's per-rank sizes (what the scheduler predicts) are the ones the sharded model holds, and both
    refuse the same sizes."""
    config = ModelConfig.from_hf_dict(tiny_config("LlamaForCausalLM", num_attention_heads=heads, head_dim=16,
                                                  num_key_value_heads=kv_heads, intermediate_size=inter,
                                                  vocab_size=vocab))
    shape = dict(num_layers=2, hidden_size=64, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                 intermediate_size=inter, vocab_size=vocab, tensor_parallel_size=size)
    try:
        rank_shape = ModelShape(**shape)
    except ValueError:
        with pytest.raises(ValueError, match=f"tensor_parallel_size={size} must divide"):
            RankLayout.of(config, _fake_tp(0, size))
        return
    for rank in range(size):
        layout = RankLayout.of(config, _fake_tp(rank, size))
        assert (layout.num_heads, layout.num_kv_heads, layout.intermediate_size, layout.vocab_rows) == (
            rank_shape.rank_heads, rank_shape.rank_kv_heads, rank_shape.rank_intermediate_size,
            rank_shape.rank_vocab_size)
