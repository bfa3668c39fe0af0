"""Comparison against float64 references, by the testing rules of docs/architecture.md.

Two bounds for every checked tensor:
  1. relative norm error ‖out − ref‖ / ‖ref‖ under the dtype's target
     (fp32 1e-5, fp16/bf16 1e-2, fp64 1e-10);
  2. ‖out − ref‖ at most 2× the error of the eager torch computation in the same dtype,
     plus one fp32 ulp of ‖ref‖ (eager fp32 can be exact to the last bit by luck).
Both bounds get an absolute floor of 1e-12·sqrt(numel): below it the float64 reference is
itself rounding noise (log_softmax rounds −log(1 + 5e-29) to 0; its error is about
1e-16·|logit| for logits up to 1e4) and float32 outputs underflow (an entropy of e^-300).
For ill-conditioned inputs (``ill_conditioned=True``: extreme values where the input dtype
itself cannot meet the target, e.g. fp32 logits in the thousands out of a matmul) only
bound 2 applies, and an eager result is then required.
NaN positions must match the reference's exactly.
"""

import torch

TARGET = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
ULP32 = 2.0 ** -23
ABS_FLOOR = 1e-12


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(name: str, out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor | None,
          dtype: torch.dtype, ill_conditioned: bool = False) -> None:
    assert eager is not None or not ill_conditioned, "ill-conditioned checks need eager"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.detach().double(), ref.detach().double()
    nan_out, nan_ref = out.isnan(), ref.isnan()
    assert torch.equal(nan_out, nan_ref), (
        f"{name}: NaN at {int(nan_out.sum())} positions, reference has {int(nan_ref.sum())}")
    keep = ~nan_ref
    out, ref = out[keep], ref[keep]
    ref_norm = ref.norm().item()
    err = (out - ref).norm().item()
    floor = ABS_FLOOR * max(ref.numel(), 1) ** 0.5
    assert ill_conditioned or err < TARGET[dtype] * ref_norm + floor, (
        f"{name}: relative error {err / max(ref_norm, 1e-300):.3e} over the {dtype} target "
        f"{TARGET[dtype]:.0e} (|ref| = {ref_norm:.3e})")
    if eager is not None:
        eager = eager.detach().double()[keep]
        eager_err = (eager - ref).norm().item()
        bound = 2.0 * eager_err + ULP32 * ref_norm + floor
        assert err <= bound, (f"{name}: error {err:.3e} exceeds 2x eager torch's "
                              f"{eager_err:.3e} (+1 ulp of |ref|)")


def rel_err_matching_nan(out: torch.Tensor, ref: torch.Tensor, name: str) -> float:
    """‖out − ref‖ / ‖ref‖ over the reference's non-NaN entries (‖out − ref‖ if ref is 0),
    after asserting that NaN sits exactly where the reference has it."""
    out, ref = out.detach().double().flatten(), ref.detach().double().flatten()
    nan_out, nan_ref = out.isnan(), ref.isnan()
    assert torch.equal(nan_out, nan_ref), (f"{name}: NaN at {int(nan_out.sum())} positions, "
                                           f"reference has {int(nan_ref.sum())}")
    keep = ~nan_ref
    scale = ref[keep].norm().item()
    diff = (out[keep] - ref[keep]).norm().item()
    return diff / scale if scale > 0 else diff
