"""kernelrl.nn.lora: LoRALinear math against a float64 reference, PEFT's init defaults, named
adapters and their context managers, merging, a 16-bit base."""

import math

import pytest
import torch
from torch import nn

from kernelrl.nn.lora import LoRAAdapters, LoRALinear


def _linear(h_in=24, h_out=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(h_in, h_out, bias=bias, dtype=dtype)


def _randomize_b(layer: LoRALinear, name="default", std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        b = layer.lora.B[name]
        b.copy_(torch.randn(b.shape, generator=g) * std)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_float64_reference(bias):
    base = _linear(bias=bias)
    layer = LoRALinear(base, r=4, alpha=12)
    _randomize_b(layer)
    torch.manual_seed(2)
    x = torch.randn(3, 5, 24, requires_grad=True)
    g = torch.randn(3, 5, 40)
    y = layer(x)
    (y * g).sum().backward()

    s = 12 / 4
    W, A, B = (t.detach().double().requires_grad_() for t in
               (base.weight, layer.lora.A["default"], layer.lora.B["default"]))
    xd = x.detach().double().requires_grad_()
    y_ref = xd @ W.T + s * (xd @ A.T) @ B.T
    if bias:
        y_ref = y_ref + base.bias.detach().double()
    (y_ref * g.double()).sum().backward()

    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora.A["default"].grad.double(), A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora.B["default"].grad.double(), B.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None and not base.weight.requires_grad
    if bias:
        assert base.bias.grad is None and not base.bias.requires_grad
    # the adapter really contributes (the test would pass trivially otherwise)
    assert (y - base(x)).abs().max() > 1e-2


def test_init_defaults_fresh_adapter_is_exact_noop():
    base = _linear(h_in=256, h_out=64)
    layer = LoRALinear(base, r=16, alpha=32)
    a, b = layer.lora.A["default"], layer.lora.B["default"]
    assert a.shape == (16, 256) and b.shape == (64, 16)
    assert a.dtype == b.dtype == torch.float32
    assert a.requires_grad and b.requires_grad
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(256)  # kaiming-uniform, a=sqrt(5): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert layer.lora.scaling["default"] == 2.0
    x = torch.randn(7, 256)
    assert torch.equal(layer(x), base(x))


def test_rslora_scaling_and_alpha_defaults_to_r():
    layer = LoRALinear(_linear(), r=4)
    assert layer.lora.scaling["default"] == 1.0
    layer.add_adapter("rs", 4, 8, use_rslora=True)
    assert layer.lora.scaling["rs"] == 8 / 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_base_keeps_float32_adapter_and_output_dtype(dtype):
    base = _linear(dtype=dtype)
    layer = LoRALinear(base, r=4, alpha=8)
    _randomize_b(layer)
    assert layer.weight.dtype == dtype
    assert layer.lora.A["default"].dtype == torch.float32
    x = torch.randn(6, 24, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    A, B = layer.lora.A["default"], layer.lora.B["default"]
    delta = (2.0 * (x.float() @ A.T) @ B.T).to(dtype)
    torch.testing.assert_close(y, base(x) + delta, rtol=0, atol=0)
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and A.grad.abs().sum() > 0
    assert base.weight.grad is None


def test_named_adapters_switch_without_copy_and_restore_on_exception():
    base = _linear()
    layer = LoRALinear(base, r=4, alpha=4, adapter_name="policy")
    layer.add_adapter("value", 2, 2)
    _randomize_b(layer, "policy", seed=1)
    _randomize_b(layer, "value", seed=2)
    assert layer.adapter_names == ["policy", "value"]
    assert layer.active_adapter == "policy"  # adding "value" did not switch
    x = torch.randn(5, 24)
    y_base = base(x)
    pol = y_base + (x @ layer.lora.A["policy"].T) @ layer.lora.B["policy"].T
    val = y_base + (x @ layer.lora.A["value"].T) @ layer.lora.B["value"].T
    ptr = layer.lora.A["policy"].data_ptr()
    torch.testing.assert_close(layer(x), pol)
    with layer.use_adapter("value"):
        torch.testing.assert_close(layer(x), val)
        with layer.disable_adapter():
            assert torch.equal(layer(x), y_base)
        torch.testing.assert_close(layer(x), val)
    torch.testing.assert_close(layer(x), pol)
    assert layer.lora.A["policy"].data_ptr() == ptr

    with pytest.raises(RuntimeError, match="boom"):
        with layer.use_adapter("value"):
            with layer.disable_adapter():
                raise RuntimeError("boom")
    assert layer.active_adapter == "policy" and layer.lora.enabled
    layer.set_adapter("value")
    torch.testing.assert_close(layer(x), val)
    layer.set_adapter(None)
    assert torch.equal(layer(x), y_base)


def test_dropout_only_on_the_adapter_branch_and_only_in_training():
    base = _linear()
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.5)
    x = torch.randn(50, 24)
    layer.train()
    assert torch.equal(layer(x), base(x))  # B = 0: dropout never reaches the base path
    _randomize_b(layer)
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    A, B = layer.lora.A["default"], layer.lora.B["default"]
    torch.testing.assert_close(layer(x), base(x) + (x @ A.T) @ B.T)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_merge_matches_unmerged_and_removes_adapter(dtype, tol):
    base = _linear(dtype=dtype)
    layer = LoRALinear(base, r=4, alpha=8)
    _randomize_b(layer)
    x = torch.randn(6, 24, dtype=dtype)
    y = layer(x)
    expected_w = (base.weight.float() + 2.0 * layer.lora.B["default"] @ layer.lora.A["default"])
    layer.merge()
    assert layer.adapter_names == [] and layer.active_adapter is None
    assert base.weight.dtype == dtype and not base.weight.requires_grad
    assert torch.equal(base.weight, expected_w.to(dtype))  # rounded once
    y_merged = layer(x)
    torch.testing.assert_close(y_merged.float(), y.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(y_merged, base(x), rtol=0, atol=0)  # not applied twice


def test_merge_refuses_with_other_adapters_and_without_active():
    layer = LoRALinear(_linear(), r=4, alpha=4)
    layer.add_adapter("value", 2, 2)
    w = layer.weight.clone()
    with pytest.raises(ValueError, match=r"other adapters \['value'\]"):
        layer.merge()
    assert torch.equal(layer.weight, w) and layer.adapter_names == ["default", "value"]
    layer.delete_adapter("value")
    layer.set_adapter(None)
    with pytest.raises(ValueError, match="no adapter is active"):
        layer.merge()
    layer.merge("default")
    assert layer.adapter_names == []


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="base: expected a torch.nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(2, 2, 1), r=2)
    layer = LoRALinear(_linear(), r=2)
    with pytest.raises(ValueError, match="r: expected a positive int, got 0"):
        layer.add_adapter("x", 0, 1)
    with pytest.raises(ValueError, match="alpha: expected a finite number > 0"):
        layer.add_adapter("x", 2, -1)
    with pytest.raises(ValueError, match=r"dropout: expected a number in \[0, 1\)"):
        layer.add_adapter("x", 2, 2, 1.0)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", 2, 2)
    with pytest.raises(ValueError, match="adapter_name: expected a Python identifier"):
        layer.add_adapter("a.b", 2, 2)
    with pytest.raises(ValueError, match="adapter_name: expected a Python identifier"):
        layer.add_adapter("training", 2, 2)
    with pytest.raises(ValueError, match=r"expected one of this layer's adapters \['default'\], "
                                         r"got 'nope'"):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="x: expected last dimension 24, got shape"):
        layer.lora.delta(torch.randn(3, 5))


def test_adapters_module_alone_and_state_dict_keys():
    ad = LoRAAdapters(8, 6)
    ad.add("p", 2, 4)
    ad.add("q", 3, 3)
    assert ad.delta(torch.randn(2, 8)) is None  # nothing active yet
    ad.set_active("q")
    assert ad.delta(torch.randn(2, 8)).shape == (2, 6)
    assert sorted(ad.state_dict()) == ["A.p", "A.q", "B.p", "B.q"]
    ad.remove("q")
    assert ad.active is None and ad.names == ["p"]
    w = ad.weight_delta("p")
    assert w.shape == (6, 8) and torch.count_nonzero(w) == 0
