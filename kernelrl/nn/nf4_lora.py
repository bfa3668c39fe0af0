"""A frozen NF4 linear layer, and LoRA adapters over it (QLoRA).

Shapes: N tokens (all leading dims of the input), H_in / H_out the layer's input and output
width, R the LoRA rank.

    NF4Linear       y = x Ŵᵀ + b, with Ŵ [H_out, H_in] stored in NF4 (4-bit codes, one
                    absmax per block of 64, double-quantized: about 4.13 bits per weight)
                    and decoded inside ``kernelrl.ops.nf4_linear``. Frozen: no parameters
                    but an optional frozen bias; everything else is buffers.
    NF4LoRALinear   NF4Linear (``.base``) plus the same ``LoRAAdapters`` (``.lora``) that
                    ``LoRALinear`` uses: y = x Ŵᵀ + b + s · (dropout(x) Aᵀ) Bᵀ, s = α / R,
                    A kaiming-uniform (a = √5), B = 0 (PEFT's defaults).

When the adapter's dtype equals the input's (float32 adapters over float32 activations,
the default on CPU), the LoRA branch goes into the same ``nf4_linear`` call: fused into the
dequant-matmul's epilogue, and into its transposed pass for dx. Otherwise (float32 adapters
over bfloat16 activations) the branch runs in the adapter's dtype, as ``LoRALinear`` does,
and is added to the base output.

State dicts use bitsandbytes' names (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``,
``bias``), so a ``Linear4bit`` checkpoint loads into ``NF4Linear`` and back. Adapter files
use PEFT's names (``kernelrl.models.save_adapter``, or ``adapter_state_dict()`` here).
"""

from __future__ import annotations

import torch
from torch import nn

from kernelrl.nn.lora import AdapterHost
from kernelrl.ops import NF4Weight, nf4_dequantize, nf4_linear, nf4_quantize

_BUFFERS = ("data", "absmax", "nested_absmax", "nested_code", "code")


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (see the module docstring)."""

    def __init__(self, qweight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(qweight, NF4Weight) or len(qweight.shape) != 2:
            raise ValueError(f"qweight: expected a 2-D NF4Weight, got "
                             f"{getattr(qweight, 'shape', type(qweight).__name__)}")
        self.out_features, self.in_features = qweight.shape
        self._meta = qweight                   # shape, dtype, blocksize, offset; tensors below
        for name in _BUFFERS:
            self.register_buffer(name, getattr(qweight, name), persistent=False)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias: expected [{self.out_features}], got "
                                 f"{tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64,
                    double_quant: bool = True) -> "NF4Linear":
        """Quantize ``linear``'s weight (its dtype is remembered: ``nf4_dequantize`` gives it
        back); the bias is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        q = nf4_quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias)

    @property
    def qweight(self) -> NF4Weight:
        """The weight as an NF4Weight over this module's (possibly moved) buffers."""
        m = self._meta
        if m.data is not self.data:            # .to() / .cuda() replaced the buffers
            m = NF4Weight(self.data, self.absmax, m.shape, m.dtype, m.blocksize,
                          self.nested_absmax, self.nested_code, m.offset, self.code)
            self._meta = m
        return m

    def _apply(self, fn, recurse=True):
        """Moves the NF4 buffers where ``fn`` sends tensors, but never changes their dtypes
        (``model.to(torch.bfloat16)`` casts the bias, not the absmax or code tables)."""
        saved = {name: self._buffers[name] for name in _BUFFERS}
        for name in _BUFFERS:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=saved["data"].device)).device
            for name, t in saved.items():
                self._buffers[name] = None if t is None else t.to(device)
        return self

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weight was quantized from."""
        return self._meta.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.qweight, bias=self.bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ in ``dtype`` (default: the original weight's)."""
        return nf4_dequantize(self.qweight, dtype)

    # bitsandbytes' key names, not the buffers' own
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)      # the bias
        for key, t in self.qweight.to_state_dict(prefix + "weight").items():
            destination[key] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        if key not in state_dict:
            missing_keys.append(key)
        else:
            try:
                q = NF4Weight.from_state_dict(mine, key)
            except ValueError as e:
                error_msgs.append(str(e))
            else:
                if q.shape != (self.out_features, self.in_features):
                    error_msgs.append(f"{key}: shape {tuple(q.shape)} does not match "
                                      f"[{self.out_features}, {self.in_features}]")
                else:
                    device = self.data.device
                    q = q.to(device)
                    self._meta = q
                    for name in _BUFFERS:
                        setattr(self, name, getattr(q, name))
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        m = self._meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={m.blocksize}, "
                f"double_quant={m.double_quant}, dtype={str(m.dtype).removeprefix('torch.')}")


class NF4LoRALinear(AdapterHost, nn.Module):
    """Named LoRA adapters (``.lora``) over a frozen NF4 linear (``.base``).

    ``NF4LoRALinear(base, r=16, alpha=16)`` wraps an ``NF4Linear`` and adds one adapter
    named ``adapter_name`` (made active); ``r=None`` wraps without one. The adapter methods
    (``add_adapter``, ``set_adapter``, ``use_adapter``, ``disable_adapter``,
    ``enable_adapter``...) are ``LoRALinear``'s.

    forward(x [..., H_in]) = x Ŵᵀ + b + s · (dropout(x) Aᵀ) Bᵀ  →  [..., H_out]
    """

    def __init__(self, base: NF4Linear, r: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, *, adapter_name: str = "default",
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, NF4Linear):
            raise ValueError(f"base: expected an NF4Linear, got {type(base).__name__}")
        self._hold(base, r, alpha, dropout, adapter_name, use_rslora, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, alpha: float = 16,
                    dropout: float = 0.0, blocksize: int = 64, double_quant: bool = True, *,
                    adapter_name: str = "default", dtype: torch.dtype = torch.float32
                    ) -> "NF4LoRALinear":
        """Quantize ``linear`` to NF4 and add adapter ``adapter_name`` (rank r, s = α/r)."""
        return cls(NF4Linear.from_linear(linear, blocksize=blocksize,
                                         double_quant=double_quant),
                   r, alpha, dropout, adapter_name=adapter_name, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora
        if not lora.is_applied:
            return self.base(x)
        name = lora.active
        a, b = lora.A[name], lora.B[name]
        if a.dtype != x.dtype:                 # the adapter's own precision, as LoRALinear
            return self.base(x) + lora.delta(x, x.dtype)
        p = lora.dropout_p(name) if self.training else 0.0
        return nf4_linear(x, self.base.qweight, bias=self.base.bias, lora_a=a, lora_b=b,
                          lora_scale=lora.scaling[name], lora_dropout=p)

    def merge(self, adapter_name: str | None = None) -> nn.Linear:
        """A new ``nn.Linear`` (in the original weight's dtype) holding Ŵ + s·B A, the sum
        formed in float32 and rounded once, plus the bias. This layer is left unchanged."""
        name = adapter_name if adapter_name is not None else self.lora.active
        if name is None:
            raise ValueError("adapter_name: expected an adapter to merge, got None and no "
                             f"adapter is active (adapters: {self.lora.names})")
        self.lora._require(name)
        dtype = self.base.weight_dtype
        w = self.base.dequantized(torch.float32) + self.lora.weight_delta(name, torch.float32)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(w.to(dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s (default: the active one's) A and B only, under PEFT's
        layer-level names ``lora_A.weight`` [R, H_in] and ``lora_B.weight`` [H_out, R]
        (``kernelrl.models.save_adapter`` writes a whole model's as a PEFT folder)."""
        name = adapter_name if adapter_name is not None else self.lora.active
        self.lora._require(name)
        return {"lora_A.weight": self.lora.A[name].detach(),
                "lora_B.weight": self.lora.B[name].detach()}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
