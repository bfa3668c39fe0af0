"""kernelrl's fused ops. Each dispatches per call to native, Triton or torch (kernelrl.backend)."""

from kernelrl.ops.logprobs import token_logprobs
from kernelrl.ops.linear_logprobs import linear_logprobs

__all__ = ["token_logprobs", "linear_logprobs"]
