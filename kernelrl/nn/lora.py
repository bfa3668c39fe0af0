"""LoRA adapters over a frozen linear layer, with several named adapters per layer.

Shapes: B batch, T time, N tokens (all leading dims of the input, N = B·T), H_in / H_out the
linear's input and output width, R the LoRA rank. (In the formulas, A and B are the adapter
matrices; B there is the up-projection, not the batch size.)

Math, for the active adapter (A: [R, H_in], B: [H_out, R], both trainable; W: [H_out, H_in]
and b: [H_out] frozen):

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ           x: [..., H_in] → y: [..., H_out]
    s = α / R            (or α / √R with rsLoRA)

    ∂L/∂B = s · gᵀ (dropout(x) Aᵀ)        [H_out, R]      g = ∂L/∂y flattened to [N, H_out]
    ∂L/∂A = s · (g B)ᵀ dropout(x)         [R, H_in]       W and b get no gradient

Initialisation (the PEFT defaults): A ~ kaiming-uniform with a = √5, i.e. U(−1/√H_in, 1/√H_in);
B = 0, so a fresh adapter is an exact no-op (the output equals the base output bit for bit).

Precision: the adapter weights are float32 by default even over a bfloat16/float16 base (their
updates are far smaller than a 16-bit weight's rounding step). The LoRA branch is computed in
the adapter dtype (x is cast up, dropout applied there) and only the [N, H_out] delta is cast
back to the base output's dtype before it is added.

Merging folds the active adapter into the base weight, W ← round(W + s · B A), with the sum
formed in float32 (or wider) and rounded once into the base dtype. The merged adapter is then
deleted from the layer, so it can never be applied twice.

Pieces:
    LoRAAdapters   the adapter state alone: per-name A, B, scaling and dropout, the active name
                   and an enabled flag; ``delta(x)`` returns the active adapter's term. It knows
                   nothing about the base layer, so other bases (a 4-bit NF4 linear) reuse it.
    LoRALinear     composes a frozen ``nn.Linear`` (``.base``) with a ``LoRAAdapters``
                   (``.lora``): forward = base(x) + lora.delta(x).

Switching the active adapter only changes a Python string: no weight is copied or moved, and
``requires_grad`` is left as it is (every adapter stays trainable; a forward only reaches the
active one, so only it gets gradients).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_RESERVED = frozenset(dir(nn.ParameterDict())) | frozenset(dir(nn.ModuleDict()))


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_adapter_name(name) -> str:
    """An adapter name must be a Python identifier (it becomes a parameter name)."""
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
        raise ValueError(f"adapter_name: expected a Python identifier that is not a reserved "
                         f"nn.Module attribute, got {name!r}")
    return name


def check_lora_hyperparameters(r, alpha, dropout) -> tuple[int, float, float]:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r: expected a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
            math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0.0 <= dropout < 1.0):
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    return r, float(alpha), float(dropout)


class LoRAAdapters(nn.Module):
    """Named LoRA adapters for one [H_out, H_in] linear map; at most one is active.

    Parameters are stored as ``A.<name>`` ([R, H_in]) and ``B.<name>`` ([H_out, R]). The
    active adapter is ``active`` (a name or None); ``enabled`` False turns every adapter off.
    ``active`` may name an adapter this layer does not have: the layer then adds nothing (a
    model-wide switch to an adapter that only targets some layers).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{arg}: expected a positive int, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}
        self.active: str | None = None
        self.enabled: bool = True

    # ---- bookkeeping ---------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Adapter names in the order they were added."""
        return list(self.A.keys())

    def __contains__(self, name) -> bool:
        return name in self.r

    def _require(self, name, arg: str = "adapter_name") -> str:
        if name not in self.r:
            raise ValueError(f"{arg}: expected one of this layer's adapters {self.names}, "
                             f"got {name!r}")
        return name

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, *,
            use_rslora: bool = False, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> None:
        """Add adapter ``name`` with rank r: A kaiming-uniform (a=√5), B zero.

        The adapter weights are created in ``dtype`` (float32 by default, whatever the base's
        dtype). The active adapter is not changed.
        """
        check_adapter_name(name)
        r, alpha, dropout = check_lora_hyperparameters(r, alpha, dropout)
        if name in self:
            raise ValueError(f"adapter_name: adapter {name!r} already exists on this layer "
                             f"(adapters: {self.names})")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype: expected one of {[_dt(d) for d in _FLOAT_DTYPES]}, "
                             f"got {dtype}")
        a = torch.empty(r, self.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, r, dtype=dtype, device=device)
        self.A[name] = nn.Parameter(a)
        self.B[name] = nn.Parameter(b)
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name] = r
        self.alpha[name] = alpha
        self.rslora[name] = bool(use_rslora)
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def remove(self, name: str) -> None:
        """Delete adapter ``name``; if it was active, no adapter is active afterwards."""
        self._require(name)
        del self.A[name], self.B[name], self.dropout[name]
        del self.r[name], self.alpha[name], self.scaling[name], self.rslora[name]
        if self.active == name:
            self.active = None

    def dropout_p(self, name: str) -> float:
        d = self.dropout[self._require(name)]
        return d.p if isinstance(d, nn.Dropout) else 0.0

    def set_active(self, name: str | None, *, missing_ok: bool = False) -> None:
        """Make ``name`` the active adapter (None: no adapter). Copies nothing."""
        if name is not None and not isinstance(name, str):
            raise ValueError(f"adapter_name: expected a str or None, got {type(name).__name__}")
        if name is not None and not missing_ok:
            self._require(name)
        self.active = name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Context manager: ``name`` is active (and adapters enabled) inside; the previous
        state is restored on exit, also on an exception."""
        self._require(name)
        saved = (self.active, self.enabled)
        self.active, self.enabled = name, True
        try:
            yield
        finally:
            self.active, self.enabled = saved

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Context manager: no adapter is applied inside (base only); restored on exit."""
        saved = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = saved

    @contextlib.contextmanager
    def enable(self) -> Iterator[None]:
        """Context manager: adapters applied inside (the active one); restored on exit."""
        saved = self.enabled
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = saved

    @property
    def is_applied(self) -> bool:
        """True when a forward adds an adapter term."""
        return self.enabled and self.active in self.r

    # ---- math ----------------------------------------------------------------------------

    def delta(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """s · (dropout(x) Aᵀ) Bᵀ for the active adapter, [..., H_in] → [..., H_out], or None
        when no adapter applies. Computed in the adapter dtype, returned in ``out_dtype``
        (default: x's dtype)."""
        if not self.is_applied:
            return None
        name = self.active
        a, b = self.A[name], self.B[name]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        h = F.linear(self.dropout[name](x.to(a.dtype)), a)          # [..., R]
        d = F.linear(h * self.scaling[name], b)                     # [..., H_out]
        return d.to(out_dtype if out_dtype is not None else x.dtype)

    def weight_delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s · B A as a [H_out, H_in] tensor in ``dtype`` (computed in at least float32)."""
        self._require(name)
        compute = torch.promote_types(torch.promote_types(dtype, torch.float32),
                                      self.A[name].dtype)
        with torch.no_grad():
            w = (self.B[name].to(compute) @ self.A[name].to(compute)) * self.scaling[name]
        return w.to(dtype)

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, alpha={self.alpha[n]:g}, scaling={self.scaling[n]:g}"
                 for n in self.names]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active!r}, enabled={self.enabled}" +
                "".join(f"\n{p}" for p in parts))


class AdapterHost:
    """The adapter methods of a layer that holds a ``LoRAAdapters`` as ``.lora`` over some
    frozen ``.base`` (``LoRALinear`` over an ``nn.Linear``, ``NF4LoRALinear`` over NF4): one
    adapter implementation, whatever the base. New adapters go on the base's device."""

    lora: LoRAAdapters
    base: nn.Module

    def _hold(self, base: nn.Module, r: int | None, alpha: float | None, dropout: float,
              adapter_name: str, use_rslora: bool, dtype: torch.dtype) -> None:
        """Freeze ``base``, hold it with an empty ``LoRAAdapters`` and, with ``r``, add
        adapter ``adapter_name`` (alpha defaults to r) and make it active."""
        if r is None and alpha is not None:
            raise ValueError(f"alpha: given ({alpha!r}) without r; pass r to add an adapter")
        base.requires_grad_(False)
        self.base = base
        self.lora = LoRAAdapters(base.in_features, base.out_features)
        if r is not None:
            self.add_adapter(adapter_name, r, alpha if alpha is not None else r, dropout,
                             use_rslora=use_rslora, dtype=dtype)
            self.lora.set_active(adapter_name)

    def _adapter_device(self) -> torch.device:
        for t in itertools.chain(self.base.parameters(), self.base.buffers()):
            return t.device
        return torch.device("cpu")

    @property
    def active_adapter(self) -> str | None:
        return self.lora.active

    @property
    def adapter_names(self) -> list[str]:
        return self.lora.names

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, *,
                    use_rslora: bool = False, dtype: torch.dtype = torch.float32) -> None:
        """Add a named adapter on the base's device; does not change the active adapter."""
        self.lora.add(name, r, alpha, dropout, use_rslora=use_rslora, dtype=dtype,
                      device=self._adapter_device())

    def delete_adapter(self, name: str) -> None:
        self.lora.remove(name)

    def set_adapter(self, name: str | None) -> None:
        self.lora.set_active(name)

    def use_adapter(self, name: str):
        """Context manager: adapter ``name`` active inside, previous state restored on exit."""
        return self.lora.use(name)

    def disable_adapter(self):
        """Context manager: base only inside, previous state restored on exit."""
        return self.lora.disable()

    def enable_adapter(self):
        """Context manager: the active adapter applied inside, previous state restored."""
        return self.lora.enable()


class LoRALinear(AdapterHost, nn.Module):
    """A frozen ``nn.Linear`` (``.base``) plus named LoRA adapters (``.lora``).

    ``LoRALinear(base, r=16, alpha=16)`` wraps ``base`` and adds one adapter named
    ``adapter_name`` (made active); with ``r=None`` it wraps without adding one. The base's
    parameters are frozen (``requires_grad=False``); the base may be float32, float16 or
    bfloat16 and keeps its dtype. The adapters are float32 unless ``dtype`` says otherwise; the
    output has the base output's dtype.

    forward(x [..., H_in]) = base(x) + s · (dropout(x) Aᵀ) Bᵀ  →  [..., H_out]
    """

    def __init__(self, base: nn.Linear, r: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, *, adapter_name: str = "default",
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base: expected a torch.nn.Linear, got {type(base).__name__}")
        if base.weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"base: expected a weight dtype in "
                             f"{[_dt(d) for d in _FLOAT_DTYPES]}, got {base.weight.dtype}")
        self._hold(base, r, alpha, dropout, adapter_name, use_rslora, dtype)

    # The attributes code written for nn.Linear reads.
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        d = self.lora.delta(x, y.dtype)
        return y if d is None else y + d

    def merge(self, adapter_name: str | None = None) -> None:
        """Fold an adapter (default: the active one) into the base weight and delete it.

        W ← round_to_base_dtype(W + s · B A), the sum formed in float32 (float64 for a float64
        base) and rounded once. Afterwards the adapter no longer exists on this layer, so it
        cannot be applied a second time on top of the merged weight. Refused while the layer
        holds other adapters: they were trained against the unmerged weight (delete them
        first, or merge a copy of the model).
        """
        name = adapter_name if adapter_name is not None else self.lora.active
        if name is None:
            raise ValueError("adapter_name: expected an adapter to merge, got None and no "
                             f"adapter is active (adapters: {self.lora.names})")
        self.lora._require(name)
        others = [n for n in self.lora.names if n != name]
        if others:
            raise ValueError(f"adapter_name: merging {name!r} would change the base weight "
                             f"under the other adapters {others}; delete them first "
                             "(delete_adapter) or merge a copy of the model")
        w = self.base.weight
        compute = torch.promote_types(w.dtype, torch.float32)
        with torch.no_grad():
            merged = w.to(compute) + self.lora.weight_delta(name, compute)
            w.copy_(merged.to(w.dtype))
        self.lora.remove(name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
