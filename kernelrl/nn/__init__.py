"""Thin nn.Modules over kernelrl.ops."""

from kernelrl.nn.lora import LoRAAdapters, LoRALinear

__all__ = ["LoRAAdapters", "LoRALinear"]
