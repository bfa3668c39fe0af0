"""NF4 4-bit weights (bitsandbytes' format) and the dequant-matmul with a fused LoRA branch.

Shapes (the package legend): N tokens (rows of x), R LoRA rank; a linear layer's weight is
[out, in]. The weight Ŵ is stored in NF4 (see :mod:`kernelrl.ops.nf4.format`: 4-bit codes,
one absmax per block of 64, the absmax double-quantized to 8 bits) and decoded on the fly:

    y  = x·Ŵᵀ + bias + s·(d(x)·Aᵀ)·Bᵀ          x [N, in], A [R, in], B [out, R], d = dropout
    dx = g·Ŵ + s·((g·B)·A) ⊙ d′                  g = ∂L/∂y; d′ the dropout's mask and scale
    dA = s·(g·B)ᵀ·d(x)     dB = s·gᵀ·(d(x)·Aᵀ)     dbias = Σ_rows g

(QLoRA, Dettmers et al. 2023, Eq. 5-6; LoRA, Hu et al. 2021, Eq. 3 with s = α/r.) Ŵ is frozen
and gets no gradient.

Two shape regimes, each dispatched on its own (``kernelrl info`` lists both):
- ``nf4_gemv``: up to 16 rows, the rollout's decode step. native: the C++ kernel on CPU and
  the CUDA kernel on GPU, which read the packed bytes and decode the double-quantized scales
  in the kernel; triton: a split-N GEMV kernel; torch: the chunked path.
- ``nf4_matmul``: more rows, training. triton: a dequant-GEMM that decodes each weight tile in
  registers inside its K loop and adds the LoRA product in the epilogue, so no dequantized
  weight exists in memory; the same kernel with the weight's strides swapped gives dx.
  native (CPU): the C++ dequantizer a slice of rows at a time, then a matmul per slice;
  torch: the same chunked path with a torch dequantizer.

Modules:
    format      the format, NF4Weight (with bitsandbytes-named state dicts), torch reference
    torch_impl  the float64 reference of nf4_linear and the chunked path
    native_impl kernelrl._native (csrc/nf4): quantize, dequantize rows, decode GEMV
    triton_impl the Triton dequant-GEMM and GEMV
    op          nf4_quantize, nf4_dequantize, nf4_linear and its autograd.Function
"""

from kernelrl.ops.nf4.format import NF4Weight
from kernelrl.ops.nf4.op import nf4_dequantize, nf4_linear, nf4_quantize

__all__ = ["NF4Weight", "nf4_quantize", "nf4_dequantize", "nf4_linear"]
