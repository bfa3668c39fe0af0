"""NF4Linear and NF4LoRALinear: against PEFT's LoRA over the same dequantized weight, adapter
switching, merging, bitsandbytes-named state dicts; quantize_model on a tiny Llama."""

import math

import pytest
import torch
from torch import nn

from kernelrl.models import (apply_lora, lora_modules, merge_lora, nf4_modules,
                             quantize_model, save_adapter)
from kernelrl.nn import LoRALinear, NF4Linear, NF4LoRALinear
from kernelrl.ops import nf4_dequantize
from numerics import rel_err


def _linear(n_in=96, n_out=40, bias=True, dtype=torch.float32):
    lin = nn.Linear(n_in, n_out, bias=bias)
    return lin.to(dtype)


def test_from_linear_defaults_follow_peft():
    lin = _linear()
    m = NF4LoRALinear.from_linear(lin, r=8, alpha=16)
    a, b = m.lora.A["default"], m.lora.B["default"]
    assert a.shape == (8, 96) and b.shape == (40, 8) and m.lora.scaling["default"] == 2.0
    assert torch.all(b == 0) and a.abs().max() <= 1 / math.sqrt(96)
    assert a.requires_grad and b.requires_grad
    assert not any(p.requires_grad for p in m.base.parameters())
    x = torch.randn(5, 96)
    assert torch.equal(m(x), m.base(x))                     # B = 0: an exact no-op
    w = nf4_dequantize(m.base.qweight)
    torch.testing.assert_close(m.base(x), x @ w.t() + lin.bias)


@pytest.mark.parametrize("rows", [3, 37])          # the decode GEMV and the dequant-matmul
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_peft(rows, bias):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lin = _linear(bias=bias)
    m = NF4LoRALinear.from_linear(lin, r=4, alpha=8)
    with torch.no_grad():
        m.lora.B["default"].normal_()
    ref_lin = _linear(bias=bias)
    with torch.no_grad():
        ref_lin.weight.copy_(m.base.dequantized(torch.float32))
        if bias:
            ref_lin.bias.copy_(lin.bias)
    holder = nn.Sequential()
    holder.add_module("proj", ref_lin)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0)
    ref = peft.get_peft_model(holder, cfg)
    layer = ref.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(m.lora.A["default"])
        layer.lora_B["default"].weight.copy_(m.lora.B["default"])
    x = torch.randn(rows, 96, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = m(x), ref(xr)
    assert rel_err(y, yr) < 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert rel_err(x.grad, xr.grad) < 1e-5
    assert rel_err(m.lora.A["default"].grad, layer.lora_A["default"].weight.grad) < 1e-5
    assert rel_err(m.lora.B["default"].grad, layer.lora_B["default"].weight.grad) < 1e-5


def test_adapter_switching_and_bf16_activations():
    m = NF4LoRALinear.from_linear(_linear(), r=4, alpha=4)
    with torch.no_grad():
        m.lora.B["default"].normal_()
    x = torch.randn(6, 96)
    base = m.base(x)
    with m.disable_adapter():
        assert torch.equal(m(x), base)
        with m.enable_adapter():
            assert not torch.equal(m(x), base)
    assert not torch.equal(m(x), base)
    m.add_adapter("other", 2, 2)
    with m.use_adapter("other"):
        assert torch.equal(m(x), base)                      # its B is still zero
    xb = x.to(torch.bfloat16)                               # float32 adapter, bf16 input
    yb = m(xb)
    assert yb.dtype == torch.bfloat16 and rel_err(yb, m(x)) < 2e-2


def test_merge_returns_a_linear_with_the_adapter_folded_in():
    lin = _linear(dtype=torch.bfloat16)
    m = NF4LoRALinear.from_linear(lin, r=4, alpha=8)
    with torch.no_grad():
        m.lora.B["default"].normal_(std=0.1)
    merged = m.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.bfloat16
    want = (m.base.dequantized(torch.float32) + 2.0 * m.lora.B["default"] @ m.lora.A["default"])
    assert torch.equal(merged.weight, want.detach().to(torch.bfloat16))
    assert torch.equal(merged.bias, lin.bias)
    assert "default" in m.lora                               # the layer itself is unchanged
    assert set(m.adapter_state_dict()) == {"lora_A.weight", "lora_B.weight"}


def test_state_dict_uses_bitsandbytes_names_and_round_trips(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    base = NF4Linear.from_linear(_linear())
    sd = base.state_dict()
    assert set(sd) == {"bias", "weight", "weight.absmax", "weight.quant_map",
                       "weight.nested_absmax", "weight.nested_quant_map",
                       "weight.quant_state.bitsandbytes__nf4"}
    safetensors.save_file(sd, str(tmp_path / "m.safetensors"))
    fresh = NF4Linear.from_linear(_linear())
    fresh.load_state_dict(safetensors.load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), base(x))
    bad = dict(sd)
    del bad["weight.absmax"]
    with pytest.raises(RuntimeError, match="missing key 'weight.absmax'"):
        fresh.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="shape"):
        NF4Linear.from_linear(_linear(n_out=8)).load_state_dict(sd)


def test_dtype_casts_move_but_never_cast_the_nf4_buffers():
    m = NF4Linear.from_linear(_linear(), double_quant=False)
    x = torch.randn(3, 96)
    want = m(x)
    m.to(torch.bfloat16)
    assert m.absmax.dtype == torch.float32 and m.code.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16
    assert rel_err(m(x.to(torch.bfloat16)), want) < 1e-2


# ------------------------------------------------------------------ on a model
def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quantize_model_replaces_by_type_and_trains_only_adapters():
    model = _llama()
    ids = torch.randint(0, 64, (2, 9))
    quantize_model(model, r=4, alpha=8, target_modules="all-linear")
    assert len(nf4_modules(model)) == 14 and len(lora_modules(model)) == 14
    assert all(isinstance(m, NF4LoRALinear) for _, m in lora_modules(model))
    assert isinstance(model.lm_head, nn.Linear)              # the head is not a target
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.A." in n or ".lora.B." in n for n in trainable)
    out = model(ids).logits
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora.A." in n)
    assert type(model.model.layers[0].self_attn).forward is not None   # nothing rebound


def test_quantize_model_close_to_the_dequantized_model_and_peft_loads_the_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = _llama()
    ids = torch.randint(0, 64, (2, 9))
    quantize_model(model, r=4, alpha=8)
    for _, m in lora_modules(model):
        with torch.no_grad():
            m.lora.B["default"].normal_(std=0.05)
    save_adapter(model, tmp_path / "adapter")
    plain = _llama()
    names = dict(nf4_modules(model))
    with torch.no_grad():
        for name, mod in plain.named_modules():
            key = name + ".base"
            if key in names:
                mod.weight.copy_(names[key].dequantized(torch.float32))
    ref = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter"))
    assert rel_err(model(ids).logits, ref(ids).logits) < 1e-5
    merged = merge_lora(model, unload=True)
    assert not nf4_modules(merged) and not lora_modules(merged)
    assert rel_err(merged(ids).logits, ref(ids).logits) < 1e-5


def test_quantize_model_errors_and_quantize_only():
    model = _llama()
    apply_lora(model, r=2, alpha=2)
    with pytest.raises(ValueError, match="before apply_lora"):
        quantize_model(model)
    model = quantize_model(_llama(), r=0)
    assert len(nf4_modules(model)) == 14 and not lora_modules(model)   # 7 targets x 2 layers
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="r: expected an int"):
        quantize_model(_llama(), r=-1)
    plain = _llama()
    apply_lora(plain, r=2, alpha=2)
    assert all(type(m) is LoRALinear for _, m in lora_modules(plain))   # 16-bit stays 16-bit


def test_a_4bit_adapter_reloads_over_the_same_4bit_base(tmp_path):
    """save_adapter records the NF4 layers; load_adapter into a full-precision copy of the
    base quantizes them the same way, so the outputs are identical."""
    from kernelrl.models import load_adapter
    model = quantize_model(_llama(), r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    for _, m in lora_modules(model):
        with torch.no_grad():
            m.lora.B["default"].normal_(std=0.05)
    folder = save_adapter(model, tmp_path / "adapter")
    assert (folder / "kernelrl_nf4.json").is_file()
    fresh = load_adapter(_llama(), folder, trainable=False)
    assert sorted(n for n, _ in nf4_modules(fresh)) == sorted(n for n, _ in nf4_modules(model))
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    plain = _llama()
    apply_lora(plain, r=4, alpha=8)
    save_adapter(plain, folder)                              # a 16-bit adapter: record gone
    assert not (folder / "kernelrl_nf4.json").exists()
    (folder / "kernelrl_nf4.json").write_text('{"modules": ["model.nope"], "blocksize": 64, '
                                              '"double_quant": true}')
    with pytest.raises(ValueError, match="no layer 'model.nope'"):
        load_adapter(_llama(), folder)


def test_a_bitsandbytes_4bit_checkpoint_loads_as_nf4(tmp_path):
    """A model saved already quantized by transformers + bitsandbytes (NF4, double quant)
    loads through load_model with kernelrl's NF4Linear in place of Linear4bit: the same
    dequantized weights, the same logits, and --qlora's adapters go on top."""
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from kernelrl.models import load_model
    from kernelrl.train.common import make_trainable
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=quant, device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    layer = theirs.model.layers[0].self_attn.q_proj
    want_w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    ours = load_model(tmp_path / "bnb")
    assert len(nf4_modules(ours)) == 7
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in ours.modules())
    assert torch.equal(ours.model.layers[0].self_attn.q_proj.dequantized(), want_w)
    ids = torch.randint(0, 64, (2, 7))
    assert rel_err(ours(ids).logits, theirs(ids).logits) < 1e-5
    make_trainable(ours, lora_r=4, qlora=True)
    assert len(lora_modules(ours)) == 7 and len(nf4_modules(ours)) == 7
