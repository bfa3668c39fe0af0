"""ppo_loss on kernelrl._native (csrc/ppo_loss): C++ kernels on CPU, CUDA kernels on a GPU
(the twins of the Triton kernels), one call per direction. The forward sums every term per
row (float64) and finishes loss, stats, ω and vf_scale in the same call (on CUDA: two kernels
from that one call, with a float64 workspace for the per-tile sums); the backward recomputes
the terms and writes the gradients. Nothing is saved between them.

Each direction is a ``torch.library.custom_op`` (what torch.compile traces); run eagerly, the
same function is called directly, without the dispatcher's per-call cost.
"""

from __future__ import annotations

import torch

from kernelrl.ops import _native
from kernelrl.ops.ppo_loss.common import AGG_MODES, NCOLS, PPOConfig, PPOInputs

#: mask dtypes the kernels read (csrc/ppo_loss/ppo_loss.h mask_kind); bool is viewed as uint8,
#: any other dtype converted to float32 (a mask is a weight: 2 counts a token twice).
_MASK_KIND = {torch.uint8: 0, torch.float32: 1}


def _operands(x: PPOInputs) -> list:
    """The ten kernel operands in PPOInputs order (None where absent), contiguous: the float
    inputs in one dtype (logprobs', or float32 where they differ: exact, but for a float64
    one, rounded as the other backends' float32 math rounds it), the mask uint8 or float32.
    Runs twice per step (forward and backward): the common case (one dtype, contiguous)
    takes one pass with no conversion."""
    dtype = x.logprobs.dtype
    out = list(x)
    mask = out[3]
    out[3] = None
    for t in out:
        if t is not None and t.dtype != dtype:
            dtype = torch.float32
            break
    for i, t in enumerate(out):
        if t is not None:
            out[i] = (t if t.dtype == dtype else t.to(dtype)).contiguous()
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    out[3] = (mask if mask.dtype in _MASK_KIND else mask.to(torch.float32)).contiguous()
    return out


def _ptrs(tensors) -> list[int]:
    return [0 if t is None else t.data_ptr() for t in tensors]


# ---------------------------------------------------------------------------------------
# the custom ops: the operands as _operands gives them, then the scalars
# ---------------------------------------------------------------------------------------

def _fwd_eager(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, values: torch.Tensor | None, old_values: torch.Tensor | None,
               returns: torch.Tensor | None, entropy: torch.Tensor | None,
               ref_logprobs: torch.Tensor | None, rollout_logprobs: torch.Tensor | None,
               lo: float, hi: float, dual_clip: float, value_clip: float, tis_cap: float,
               vf_coef: float, entropy_coef: float, kl_loss_coef: float, agg: int,
               norm_length: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [], stats [NCOLS], ω [B], vf_scale []), float32."""
    B, T = logprobs.shape
    device = logprobs.device
    f32 = dict(dtype=torch.float32, device=device)
    loss, stats = torch.empty((), **f32), torch.empty(NCOLS, **f32)
    omega, vf_scale = torch.empty(B, **f32), torch.empty((), **f32)
    lib = _native.library()
    rows = None                     # CPU: the row sums are not kept
    if device.type == "cuda":       # the per-tile sums' workspace, float64
        rows = torch.empty(lib.ppo_loss_cuda_workspace(B, T), dtype=torch.float64,
                           device=device)
    _native.launch(device, lib.ppo_loss_fwd_cpu, lib.ppo_loss_fwd_cuda,
                   *_ptrs((logprobs, old_logprobs, advantages, mask, values, old_values,
                           returns, entropy, ref_logprobs, rollout_logprobs)),
                   0 if rows is None else rows.data_ptr(),
                   *_ptrs((loss, stats, omega, vf_scale)), B, T, _native.dtype_code(logprobs.dtype),
                   _MASK_KIND[mask.dtype], advantages.dim() == 1, lo, hi, dual_clip,
                   value_clip, tis_cap, vf_coef, entropy_coef, kl_loss_coef, agg, norm_length)
    return loss, stats, omega, vf_scale


_fwd_op = torch.library.custom_op("kernelrl::ppo_loss_fwd", mutates_args=())(_fwd_eager)


@_fwd_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, values, old_values, returns, entropy,
      ref_logprobs, rollout_logprobs, lo, hi, dual_clip, value_clip, tis_cap, vf_coef,
      entropy_coef, kl_loss_coef, agg, norm_length):
    f32 = dict(dtype=torch.float32, device=logprobs.device)
    return (logprobs.new_empty((), **f32), logprobs.new_empty(NCOLS, **f32),
            logprobs.new_empty(logprobs.shape[0], **f32), logprobs.new_empty((), **f32))


def _bwd_eager(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, values: torch.Tensor | None, old_values: torch.Tensor | None,
               returns: torch.Tensor | None, entropy: torch.Tensor | None,
               ref_logprobs: torch.Tensor | None, rollout_logprobs: torch.Tensor | None,
               grad_loss: torch.Tensor, omega: torch.Tensor, vf_scale: torch.Tensor,
               lo: float, hi: float, dual_clip: float, value_clip: float, tis_cap: float,
               entropy_coef: float, kl_loss_coef: float, need_logprobs: bool,
               need_values: bool, need_entropy: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> the gradients to (logprobs, values, entropy) in logprobs' dtype, [B, T] where
    needed, else empty [0]."""
    B, T = logprobs.shape
    grads = [torch.empty_like(logprobs) if need else logprobs.new_empty(0)
             for need in (need_logprobs, need_values, need_entropy)]
    scalars = [t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()
               for t in (grad_loss, omega, vf_scale)]
    lib = _native.library()
    _native.launch(logprobs.device, lib.ppo_loss_bwd_cpu, lib.ppo_loss_bwd_cuda,
                   *_ptrs((logprobs, old_logprobs, advantages, mask, values, old_values,
                           returns, entropy, ref_logprobs, rollout_logprobs)),
                   *_ptrs(scalars),
                   *_ptrs(g if need else None for g, need in
                          zip(grads, (need_logprobs, need_values, need_entropy))),
                   B, T, _native.dtype_code(logprobs.dtype), _MASK_KIND[mask.dtype],
                   advantages.dim() == 1, lo, hi, dual_clip, value_clip, tis_cap, entropy_coef,
                   kl_loss_coef)
    return tuple(grads)


_bwd_op = torch.library.custom_op("kernelrl::ppo_loss_bwd", mutates_args=())(_bwd_eager)


@_bwd_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, values, old_values, returns, entropy,
      ref_logprobs, rollout_logprobs, grad_loss, omega, vf_scale, lo, hi, dual_clip,
      value_clip, tis_cap, entropy_coef, kl_loss_coef, need_logprobs, need_values,
      need_entropy):
    return tuple(logprobs.new_empty(tuple(logprobs.shape) if need else (0,))
                 for need in (need_logprobs, need_values, need_entropy))


# ---------------------------------------------------------------------------------------
# the backend's passes (op.py's _KERNELS interface)
# ---------------------------------------------------------------------------------------

def _token_scalars(cfg: PPOConfig) -> tuple:
    return cfg.lo, cfg.hi, cfg.dual_clip, cfg.value_clip, cfg.tis_cap


def _native_fwd(x: PPOInputs, cfg: PPOConfig, need_grads: bool, present: tuple, dtype):
    """-> (loss, stats, ω, vf_scale) as common._finish gives them (the terms whose inputs
    are absent: the kernels see null pointers), and nothing to save."""
    ops = _operands(x)
    fn = _fwd_op if torch.compiler.is_compiling() else _fwd_eager
    out = fn(*ops, *_token_scalars(cfg), cfg.vf_coef, cfg.entropy_coef, cfg.kl_loss_coef,
             AGG_MODES.index(cfg.agg), cfg.norm_length)
    if dtype != torch.float32:
        out = tuple(t.to(dtype) for t in out)
    return (*out, ())


def _native_bwd(x: PPOInputs, saved, cfg: PPOConfig, grad_loss, omega, vf_scale, needs):
    """(∂/∂logprobs, ∂/∂values, ∂/∂entropy) of ``grad_loss · loss`` (None where not needed),
    each in its input's dtype."""
    ops = _operands(x)
    fn = _bwd_op if torch.compiler.is_compiling() else _bwd_eager
    grads = fn(*ops, grad_loss, omega, vf_scale, *_token_scalars(cfg), cfg.entropy_coef,
               cfg.kl_loss_coef, *needs)
    return tuple((g if g.dtype == t.dtype else g.to(t.dtype)) if need else None
                 for g, t, need in zip(grads, (x.logprobs, x.values, x.entropy), needs))
