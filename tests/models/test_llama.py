"""CausalLM on the Triton kernels against the float64 reference decoder, on tiny random safetensors checkpoints driven
through a shuffled paged cache with chunked prefill, mixed prefill+decode batches and decode steps."""
import pytest
import torch
from safetensors.torch import load_file

import minidu.models.attention as attention_module
import minidu.models.llama as llama_module
from minidu.models import load_model
from tests.conftest import DEVICE
from tests.models.checkpoints import random_weights, tiny_config, write_checkpoint
from tests.models.paged import PagedRunner
from tests.models.reference import reference_logits

# Small original context so the tiny head_dim spans all three llama3 regimes (kept, blended, divided by factor).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
LINEAR_ROPE = {"type": "linear", "factor": 2.0}
CASES = {
    "llama-gqa-llama3rope-sharded": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE), 2),
    "qwen2-bias-tied-linearrope": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_scaling=LINEAR_ROPE), 1),
    "qwen3-qknorm-headdim32": ("Qwen3ForCausalLM", dict(head_dim=32), 1),
}
# fp32 kernels (fp32 accumulation, ieee dots) vs float64: |error| <= 1e-4 * max|logit|.
FP32_RTOL = 1e-4
NUM_SMS = 3
KERNELS = {llama_module: ["gather_rows", "rms_norm", "gemm", "rotary_embedding_and_store_kvcache"],
           attention_module: ["prefill_attention", "decode_attention"]}


def run_scenario(runner: PagedRunner, seqs: dict[str, list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    """Request a: 5-token prompt then 3 decodes; request b: 7-token prompt in chunks of 3 and 4 (the second one
    extending a cached prefix, batched with a decode of a), then 2 decodes. Returns logits by (request, position)."""
    a, b = seqs["a"], seqs["b"]
    steps = [
        ([("a", a[:5]), ("b", b[:3])], []),
        ([("b", b[3:7])], [("a", a[5])]),
        ([], [("a", a[6]), ("b", b[7])]),
        ([], [("a", a[7]), ("b", b[8])]),
    ]
    out = {}
    for prefill, decode in steps:
        logits, rows = runner.step(prefill, decode)
        out.update(zip(rows, logits))
    return out


@pytest.fixture(scope="module", params=list(CASES))
def scenario(request, tmp_path_factory):
    arch, overrides, num_shards = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    config = write_checkpoint(path, arch, seed=7, num_shards=num_shards, **overrides)
    weights = random_weights(config, seed=7)
    model, _, _ = load_model(str(path), device=DEVICE)
    generator = torch.Generator().manual_seed(3)
    seqs = {"a": torch.randint(0, config["vocab_size"], (8,), generator=generator).tolist(),
            "b": torch.randint(0, config["vocab_size"], (9,), generator=generator).tolist()}
    calls = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, kwargs.get("num_sms")))
            return fn(*args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        for module, names in KERNELS.items():
            for name in names:
                mp.setattr(module, name, recording(name, getattr(module, name)))
        logits = run_scenario(PagedRunner(model, seed=11, num_sms=NUM_SMS), seqs)
    references = {rid: reference_logits(config, weights, seq) for rid, seq in seqs.items()}
    return logits, references, calls


def test_logits_match_float64_reference(scenario):
    logits, references, _ = scenario
    assert len(logits) == 17
    for (rid, pos), got in logits.items():
        ref = references[rid][pos]
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=FP32_RTOL * ref.abs().max().item(),
                                   msg=lambda m: f"request {rid} position {pos}: {m}")


def test_every_kernel_gets_the_sm_budget(scenario):
    _, _, calls = scenario
    assert {name for name, _ in calls} == {name for names in KERNELS.values() for name in names}
    assert all(num_sms == NUM_SMS for _, num_sms in calls)


@pytest.mark.parametrize("arch, overrides", [("LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE)),
                                             ("Qwen2ForCausalLM", dict(rope_scaling=LINEAR_ROPE))])
def test_reference_is_sensitive_to_rope_scaling(arch, overrides):
    # Otherwise the scaled cases above could not tell a model that ignores rope_scaling from a correct one.
    config = tiny_config(arch, **overrides)
    weights = random_weights(config)
    tokens = list(range(10, 19))
    scaled = reference_logits(config, weights, tokens)
    unscaled = reference_logits({**config, "rope_scaling": None}, weights, tokens)
    assert (scaled - unscaled).abs().max() > 100 * FP32_RTOL * scaled.abs().max()


def test_qkv_and_gate_up_are_fused_in_checkpoint_order(tmp_path):
    config = write_checkpoint(tmp_path, "Qwen2ForCausalLM", tie_word_embeddings=True)
    weights = load_file(tmp_path / "model.safetensors")
    model, _, _ = load_model(str(tmp_path), device="cpu")
    p = "model.layers.1."
    layer = model.layers[1]
    qkv = [weights[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]
    torch.testing.assert_close(layer.qkv_proj, torch.cat(qkv), rtol=0, atol=0)
    torch.testing.assert_close(layer.qkv_bias, torch.cat([weights[f"{p}self_attn.{n}_proj.bias"] for n in "qkv"]),
                               rtol=0, atol=0)
    gate_up = torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]])
    torch.testing.assert_close(layer.gate_up_proj, gate_up, rtol=0, atol=0)
    assert layer.qkv_proj.shape == ((4 + 2 * 2) * 16, config["hidden_size"])
    assert model.lm_head.data_ptr() == model.embed_tokens.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs CUDA (the interpreter's bf16 dot is wrong)")
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_bf16_on_cuda_matches_reference(tmp_path, arch):
    config = write_checkpoint(tmp_path, arch, seed=5)
    model, _, _ = load_model(str(tmp_path), dtype="bfloat16", device="cuda")
    weights = {name: t.to(torch.bfloat16) for name, t in random_weights(config, seed=5).items()}
    seqs = {"a": list(range(3, 11)), "b": list(range(40, 49))}
    logits = run_scenario(PagedRunner(model, seed=11), seqs)
    references = {rid: reference_logits(config, weights, seq) for rid, seq in seqs.items()}
    for (rid, pos), got in logits.items():
        ref = references[rid][pos]
        # bf16 activations (8-bit mantissa) through 2 layers vs float64: |error| <= 5e-2 * max|logit|.
        torch.testing.assert_close(got.double().cpu(), ref, rtol=0, atol=5e-2 * ref.abs().max().item())
