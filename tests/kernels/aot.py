"""Ahead-of-time compilation of kernel variants for a CUDA target without a GPU; `python -m tests.kernels.aot` reads
variants as JSON on stdin and prints, per variant, its shared memory, spilled bytes or the compile error.

Triton must be imported with the interpreter off (its library functions are then compilable), before minidu."""
import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton  # noqa: I001  (before minidu, which turns the interpreter on where there is no GPU)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from minidu.kernels import decode_attention, gemm, prefill_attention, rotary

KERNELS = {"gemm": gemm._gemm_kernel, "decode_split": decode_attention._decode_split_kernel,
           "decode_merge": decode_attention._decode_merge_kernel,
           "prefill": prefill_attention._prefill_attention_kernel, "rotary": rotary._rotary_kernel}
INDEX_PTRS = {"seq_lens_ptr", "block_tables_ptr", "cu_seqlens_q_ptr", "slot_mapping_ptr", "positions_ptr"}
FP32_PTRS = {"inv_freq_ptr"}
FLOAT_ARGS = {"qk_scale", "eps"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            fp32 = name in FP32_PTRS or name.startswith("partial")
            sig[name] = "*i32" if name in INDEX_PTRS else ("*fp32" if fp32 else f"*{dtype}")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _spill_bytes(ptx: str, capability: int) -> int:
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    try:
        ptxas = get_ptxas(capability).path
    except TypeError:  # triton < 3.7: one ptxas for every target
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def compile_variant(v: dict) -> dict:
    kernel = KERNELS[v["kernel"]]
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    src = ASTSource(fn, _signature(fn.fn, v["dtype"], v["constexprs"]), constexprs=v["constexprs"])
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", v["capability"], 32),
                                  options={"num_warps": v["num_warps"], "num_stages": v["num_stages"]})
    except Exception as e:  # reported, not raised: the test names the variant
        return {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    return {"shared": compiled.metadata.shared, "spills": _spill_bytes(compiled.asm["ptx"], v["capability"])}


if __name__ == "__main__":
    print(json.dumps([compile_variant(v) for v in json.load(sys.stdin)]))
