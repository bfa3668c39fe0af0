"""Thin nn.Modules over kernelrl.ops."""

from kernelrl.nn.lora import AdapterHost, LoRAAdapters, LoRALinear
from kernelrl.nn.moe import SparseMoE
from kernelrl.nn.nf4_lora import NF4Linear, NF4LoRALinear

__all__ = ["AdapterHost", "LoRAAdapters", "LoRALinear", "NF4Linear", "NF4LoRALinear",
           "SparseMoE"]
