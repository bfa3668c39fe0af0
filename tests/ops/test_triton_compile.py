"""Compile every Triton kernel for a real GPU (sm_90) ahead of time, on any machine.

The interpreter runs the kernels' semantics on CPU tensors but does not type-check or
lower them; a kernel can pass every interpreted test and still fail to compile. Triton
compiles to PTX and a cubin without a GPU, so this runs in CI. It runs in a subprocess
because the test session has TRITON_INTERPRET=1 set, which replaces the JIT functions.
"""

import json
import subprocess
import sys
import textwrap

import pytest

# kernel -> (module, signature; constexpr variants to compile)
DTYPES = ["fp32", "fp16", "bf16"]
KERNELS = {
    "_logprobs_fwd_kernel": ("kernelrl.ops.logprobs", {
        "logits_ptr": "*{dt}", "labels_ptr": "*i64", "logp_ptr": "*fp32",
        "stats_ptr": "*fp32", "ent_ptr": "*fp32", "V": "i32", "stride_row": "i64",
        "inv_temperature": "fp32", "ignore_index": "i64",
        "BLOCK_V": "constexpr", "HAS_ENTROPY": "constexpr"},
        [{"BLOCK_V": 4096, "HAS_ENTROPY": True}, {"BLOCK_V": 1024, "HAS_ENTROPY": False}]),
    "_logprobs_bwd_kernel": ("kernelrl.ops.logprobs", {
        "logits_ptr": "*{dt}", "labels_ptr": "*i64", "stats_ptr": "*fp32", "ent_ptr": "*fp32",
        "grad_logp_ptr": "*fp32", "grad_ent_ptr": "*fp32", "grad_ptr": "*{dt}",
        "n_cols": "i32", "vocab_size": "i32", "col_offset": "i32", "stride_row": "i64",
        "stride_grad_row": "i64", "inv_temperature": "fp32", "ignore_index": "i64",
        "BLOCK_V": "constexpr", "HAS_ENTROPY_GRAD": "constexpr"},
        [{"BLOCK_V": 4096, "HAS_ENTROPY_GRAD": True}, {"BLOCK_V": 1024, "HAS_ENTROPY_GRAD": False}]),
}

SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, module, signature, constexprs, dt = json.loads(sys.argv[1])
    fn = getattr(importlib.import_module(module), name)
    sig = {k: v.format(dt=dt) for k, v in signature.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert kernel.asm["cubin"], "no cubin produced"
    print("ok", name, dt, len(kernel.asm["cubin"]))
""")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_compiles_for_sm90(name, dt):
    module, signature, variants = KERNELS[name]
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    for constexprs in variants:
        arg = json.dumps([name, module, signature, constexprs, dt])
        res = subprocess.run([sys.executable, "-c", SCRIPT, arg], capture_output=True,
                             text=True, timeout=300, env=env)
        assert res.returncode == 0, f"{name} {dt} {constexprs} failed to compile:\n{res.stderr[-3000:]}"
        assert res.stdout.startswith("ok")
