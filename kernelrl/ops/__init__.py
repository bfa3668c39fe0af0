"""kernelrl's fused ops. Each dispatches per call to native, Triton or torch (kernelrl.backend).

Shape legend, one for the whole package (each letter has one meaning everywhere):
    B batch (sequences)      T time (tokens per sequence)    N tokens (B·T, flattened)
    V vocabulary             H hidden width                  E experts
    K top-k                  F expert FFN width              R LoRA rank
Tiles of a chunked op are Nt token rows × Vt vocabulary columns. The softmax temperature
is τ and the entropy is written ent, so that neither collides with T or H.
"""

from kernelrl.ops.logprobs import token_logprobs
from kernelrl.ops.linear_logprobs import linear_logprobs
from kernelrl.ops.group_advantages import group_advantages
from kernelrl.ops.preference import dpo_loss, reward_loss
from kernelrl.ops.advantages import Advantages, kl_penalized_advantages
from kernelrl.ops.ppo_loss import ppo_loss
from kernelrl.ops.nf4 import NF4Weight, nf4_dequantize, nf4_linear, nf4_quantize
from kernelrl.ops.moe import load_balancing_loss, moe_ffn, router_z_loss, topk_route

__all__ = ["token_logprobs", "linear_logprobs", "group_advantages", "dpo_loss", "reward_loss",
           "kl_penalized_advantages", "Advantages", "ppo_loss",
           "NF4Weight", "nf4_quantize", "nf4_dequantize", "nf4_linear",
           "topk_route", "load_balancing_loss", "router_z_loss", "moe_ffn"]
