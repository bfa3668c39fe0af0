"""Bridges to Hugging Face causal LMs: module replacement by type (LoRA, NF4, MoE blocks),
model-side log-probs (never the full logits), the reward model, local loading."""

from kernelrl.models.hf import check_supported, load_model, load_tokenizer
from kernelrl.models.logprobs import sequence_logprobs, token_logprobs
from kernelrl.models.lora import (DEFAULT_TARGET_MODULES, active_adapter, adapter_names,
                                  apply_lora, delete_adapter, disable_adapters, load_adapter,
                                  lora_modules, merge_lora, parameter_counts,
                                  register_lora_wrapper, save_adapter, set_adapter,
                                  trainable_parameters, use_adapter)
from kernelrl.models.moe import config_router_aux_coef, moe_modules, patch_moe, router_aux_loss
from kernelrl.models.qlora import nf4_modules, quantize_model
from kernelrl.models.reward import RewardModel

__all__ = ["DEFAULT_TARGET_MODULES", "RewardModel", "active_adapter", "adapter_names",
           "apply_lora", "check_supported", "delete_adapter", "disable_adapters",
           "load_adapter", "load_model", "load_tokenizer", "lora_modules", "merge_lora",
           "nf4_modules", "quantize_model", "patch_moe", "moe_modules", "router_aux_loss",
           "config_router_aux_coef",
           "parameter_counts", "register_lora_wrapper", "save_adapter", "sequence_logprobs",
           "set_adapter", "token_logprobs", "trainable_parameters", "use_adapter"]
