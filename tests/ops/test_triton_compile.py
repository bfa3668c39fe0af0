"""Compile every Triton kernel of kernelrl.ops for a real GPU (sm_90) ahead of time, on any machine.

The interpreter runs the kernels' semantics on CPU tensors but does not type-check or lower
them; a kernel can pass every interpreted test and still fail to compile. Triton compiles to
PTX and a cubin without a GPU, so this runs in CI.

The kernels are discovered, not listed: every module under kernelrl.ops is imported and each
triton JITFunction it defines (not imports) whose name ends in `_kernel` is a kernel (the
`@triton.jit` helpers of _triton_utils are compiled as part of the kernels that call them).
Signatures live next to the kernels: a module that defines kernels has

    AOT_SIGNATURES = {kernel_name: (signature, [constexpr_variant, ...])}

where signature maps every parameter to a Triton type ("*{dt}" stands for the dtype under
test: fp32, fp16 or bf16; constexpr parameters map to "constexpr") and each variant gives the
constexpr values of one compile. A kernel without an entry, or whose entry does not name exactly
its parameters, fails here. Discovery and compiles run in subprocesses without TRITON_INTERPRET
(the test session sets it, and the interpreter replaces the JIT functions).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

DTYPES = ["fp32", "fp16", "bf16"]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

DISCOVER = textwrap.dedent("""
    import importlib, json, pkgutil
    from triton.runtime.jit import JITFunction
    import kernelrl.ops
    kernels, stale = [], []
    for info in pkgutil.walk_packages(kernelrl.ops.__path__, "kernelrl.ops."):
        module = importlib.import_module(info.name)
        defined = {name: obj for name, obj in vars(module).items()
                   if isinstance(obj, JITFunction) and name.endswith("_kernel")
                   and obj.fn.__module__ == module.__name__ and obj.fn.__name__ == name}
        aot = getattr(module, "AOT_SIGNATURES", {})
        for name, fn in sorted(defined.items()):
            kernels.append({"module": info.name, "name": name, "params": fn.arg_names,
                            "aot": aot.get(name)})
        stale += [f"{info.name}.AOT_SIGNATURES[{name!r}]"
                  for name in sorted(set(aot) - set(defined))]
    print(json.dumps({"kernels": kernels, "stale": stale}))
""")

COMPILE = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, name, signature, variants, dt = json.loads(sys.argv[1])
    fn = getattr(importlib.import_module(module), name)
    sig = {k: v.format(dt=dt) for k, v in signature.items()}
    for constexprs in variants:
        print("compiling", constexprs, flush=True)
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert kernel.asm["cubin"], "no cubin produced"
        print("ok", len(kernel.asm["cubin"]), flush=True)
""")


def discover() -> dict:
    """{"kernels": [{module, name, params, aot}], "stale": [...], "error": str | None}."""
    res = subprocess.run([sys.executable, "-c", DISCOVER], capture_output=True, text=True,
                         timeout=300, env=ENV)
    if res.returncode != 0:
        return {"kernels": [], "stale": [], "error": res.stderr[-4000:]}
    return {**json.loads(res.stdout.splitlines()[-1]), "error": None}


FOUND = discover()  # once, at collection: it parametrizes the compile test


def test_kernels_discovered():
    assert FOUND["error"] is None, f"importing kernelrl.ops failed:\n{FOUND['error']}"
    assert FOUND["kernels"], "no Triton kernels (JITFunction named *_kernel) under kernelrl.ops"
    assert not FOUND["stale"], f"AOT_SIGNATURES entries for no kernel: {FOUND['stale']}"


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kernel", FOUND["kernels"],
                         ids=[f"{k['module']}.{k['name']}" for k in FOUND["kernels"]])
def test_kernel_compiles_for_sm90(kernel, dt):
    module, name = kernel["module"], kernel["name"]
    if kernel["aot"] is None:
        pytest.fail(f"Triton kernel {name} in {module} has no AOT_SIGNATURES entry: add "
                    f"AOT_SIGNATURES[{name!r}] = (signature, [constexpr variants]) to {module}")
    signature, variants = kernel["aot"]
    missing = [p for p in kernel["params"] if p not in signature]
    unknown = [p for p in signature if p not in kernel["params"]]
    assert not missing and not unknown, (
        f"{module}.AOT_SIGNATURES[{name!r}] does not match the kernel's parameters: "
        f"missing {missing}, not parameters {unknown}")
    assert variants, f"{module}.AOT_SIGNATURES[{name!r}] lists no constexpr variant"
    arg = json.dumps([module, name, signature, variants, dt])
    res = subprocess.run([sys.executable, "-c", COMPILE, arg], capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert res.returncode == 0, (
        f"{module}.{name} ({dt}) failed to compile:\n{res.stdout[-1000:]}{res.stderr[-3000:]}")
    assert sum(line.startswith("ok ") for line in res.stdout.splitlines()) == len(variants)
