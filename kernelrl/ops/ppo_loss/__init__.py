"""The PPO / GRPO / DAPO loss over per-token log-probs, forward and backward fused.

Shapes (the package legend): B batch (sequences), T time (tokens per sequence). Every
per-token input is [B, T]; ``advantages`` may be [B] (one per sequence, as GRPO gives),
broadcast over the row. m is the mask (bool, integer or float: the token's weight, 0 on
padding).

Per token (d = logprobs − old_logprobs, A the advantage, ε_l, ε_h = clip_eps, clip_eps_high):

    r     = exp(d)
    l_pg  = max(−A·r, −A·clip(r, 1 − ε_l, 1 + ε_h))      PPO (Schulman et al. 2017, Eq. 7);
                                                         ε_h > ε_l: DAPO's clip-higher
    l_pg  = min(l_pg, −c·A) where A < 0                  dual clip c (Ye et al. 2020)
    l_pg  = w·l_pg, w = min(exp(old_logprobs − rollout_logprobs), C), detached: truncated
            importance sampling (Yao et al. 2025) for rollouts from another engine
    l_vf  = ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²)  L^VF of PPO's Eq. 9, clipped
    l_kl  = exp(−k) − 1 + k, k = logprobs − ref_logprobs  the k3 estimator (GRPO, Shao et
                                                         al. 2024, Eq. 4)
    loss  = agg(l_pg) − entropy_coef·agg(entropy) + kl_loss_coef·agg(l_kl)
            + vf_coef·Σ m·l_vf / Σ m                     (the value term: a token mean)

agg, with n_b = Σ_t m and S_b(x) = Σ_t m·x per row (every row counts in B; a row or a
batch without real tokens adds 0, never 0/0):

    token-mean               Σ_b S_b / Σ_b n_b           PPO, DAPO (Yu et al. 2025)
    seq-mean-token-mean      (1/B)·Σ_b S_b / n_b         GRPO (Shao et al. 2024, Eq. 3)
    seq-mean-token-sum       (1/B)·Σ_b S_b
    seq-mean-token-sum-norm  Σ_b S_b / (B·L), L = norm_length (default T): Dr. GRPO

So agg(x) = Σ_b ω_b·S_b(x) with row weights ω_b, and the gradients are elementwise:

    ∂loss/∂logprobs = ω_b·m·(w·1[unclipped]·(−A·r) + kl_loss_coef·(1 − exp(−k)))
    ∂loss/∂entropy  = −entropy_coef·ω_b·m
    ∂loss/∂values   = vf_coef·m/Σm·1[unclipped]·(V − R)

("unclipped": the max/min kept the branch through r or V; a tie inside the clip range
counts as unclipped, as autograd through max and clamp has it). Only logprobs, values
and entropy get gradients. Padding is never read into a result: NaN or inf there does not
leak (as it would through m·x). NaN on a real token propagates to the loss, to the stats
it enters and to that token's gradient.

``stats`` (0-d tensors, no host sync): clipfrac (the clipped branch strictly larger),
approx_kl = ½·mean(d²), ratio_mean, vf_loss (before vf_coef), vf_clipfrac,
tis_weight_mean (after truncation), tis_clipfrac (fraction truncated): means over real
tokens; pg_loss, entropy, kl_loss: aggregated by ``agg``. So loss = pg_loss
− entropy_coef·entropy + kl_loss_coef·kl_loss + vf_coef·vf_loss.

Passes: the forward writes per-(row, tile) float64 sums [B, P, 11] (n_b and S_b of every
term); a few torch ops on [B, 11] finish the scalars and ω [B]; the backward is one
elementwise pass writing every gradient. Bytes moved, for k ≤ 10 [B, T] inputs of b
bytes: forward k·B·T·b read; backward the same plus B·T·b written per gradient.

Implementations (chosen per call, see kernelrl.backend):
    native   C++ on CPU, CUDA on a GPU (csrc/ppo_loss): one call per direction (the
             forward's float64 row sums and the finish, the backward recomputing the
             terms), so a GPU step costs two kernel launches from C++ forward and one
             backward; the CPU default. On CUDA, dispatch takes it once `kernelrl tune` has
             measured it faster there
    torch    plain torch, fp32 (fp64 for fp64 logprobs); the forward keeps the gradient
             coefficients, the backward scales them (any device; float64)
    triton   the GPU path: a forward over [B, ⌈T/BLOCK_T⌉] programs, a one-program finish,
             one backward pass; fp32 math, nothing saved
The oracle is ``ppo_loss_reference``: the formulas above, autograd, float64-capable.
"""

from kernelrl.ops.ppo_loss.common import AGG_MODES, COLUMNS, ppo_loss_reference
from kernelrl.ops.ppo_loss.op import PPOLossFunction, ppo_loss

__all__ = ["ppo_loss", "ppo_loss_reference", "AGG_MODES", "COLUMNS", "PPOLossFunction"]
