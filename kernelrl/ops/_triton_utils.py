"""Small @triton.jit helpers shared by the op modules' kernels."""

import triton
import triton.language as tl


@triton.jit
def downcast(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even.

    A GPU rounds fp32 -> bf16 to nearest even; the Triton interpreter truncates. Rounding
    the bits here first (a few integer ops, free in a memory-bound kernel) gives the same,
    correctly rounded result on both, so interpreter tests check GPU numerics. Inf and NaN
    survive; a finite value past the bf16 range rounds to inf as it should. NaN is passed
    through untouched: the rounding add would carry a NaN with a full mantissa (a GPU's
    canonical NaN is 0x7FFFFFFF) into the sign bit and make it -0.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def exp_fp64(x):
    """e^x for fp32 x, through float64, rounded to fp32: correctly rounded in practice.

    A GPU's tl.exp is exp2(x·log2 e) on the fast approximate unit: its relative error grows
    with |x| (the product's rounding is multiplied by the exponent) to several fp32 ulps at
    |x| ≈ 3, and a sum of many such terms inherits the bias. For per-token math on [B, T]
    tensors (one exp per element of a memory-bound kernel) the float64 path costs nothing
    measurable; the vocabulary-wide softmax kernels keep tl.exp.
    """
    return tl.exp(x.to(tl.float64)).to(tl.float32)


@triton.jit
def log1p(r):
    """log(1 + r), accurate for tiny r (Goldberg's trick: log(u)·r/(u − 1) with u = 1 + r)."""
    u = 1.0 + r
    return tl.where(u == 1.0, r, tl.log(u) * (r / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def expm1(x):
    """exp(x) − 1, accurate for tiny x (Kahan's trick: (u − 1)·x / log(u) with u = e^x).

    Used for 1 − p = −expm1(log p) at a label: computing 1 − p directly cancels when the
    token is confident (p ≈ 1) and loses the gradient's digits.
    """
    u = tl.exp(x)
    um1 = u - 1.0
    safe = (u != 1.0) & (um1 != -1.0) & (x == x) & (u != float("inf"))
    ratio = um1 * (x / tl.log(tl.where(safe, u, 2.0)))
    return tl.where(safe, ratio, tl.where(u == 1.0, x, um1))
