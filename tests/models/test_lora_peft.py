"""kernelrl.models.lora: apply_lora on tiny Llama / Qwen2 models, model-level adapter switching
and merging, and the PEFT folder format both ways against the real PEFT."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from kernelrl.nn.lora import LoRALinear
from kernelrl.models.lora import (DEFAULT_TARGET_MODULES, active_adapter, adapter_names,
                                  apply_lora, delete_adapter, disable_adapters, load_adapter,
                                  lora_modules, merge_lora, parameter_counts, save_adapter,
                                  set_adapter, trainable_parameters, use_adapter)

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SIZES)
    if dtype == torch.float32:
        return LlamaForCausalLM(cfg).eval()
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def _qwen2(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()


def _ids(seed=3):
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def _randomize_b(model, adapter="default", std=0.1, seed=7):
    """Non-zero B so a wrong key, scaling or target would change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            if adapter in m.lora:
                b = m.lora.B[adapter]
                b.copy_(torch.randn(b.shape, generator=g) * std)


def _expected_names(kinds=ATTN + MLP, layers=(0, 1)):
    return sorted(f"model.layers.{i}.{'self_attn' if k in ATTN else 'mlp'}.{k}"
                  for i in layers for k in kinds)


def test_apply_lora_wraps_only_targets_and_freezes_base():
    model = _llama()
    ids = _ids()
    ref = model(ids).logits
    n_base = sum(p.numel() for p in model.parameters())
    assert apply_lora(model, r=4, alpha=8) is model
    names = [n for n, _ in lora_modules(model)]
    assert sorted(names) == _expected_names()
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora.A." in name or ".lora.B." in name), name
    # per layer: q, o 4·32+32·4; k, v 4·32+16·4; gate, up 4·32+64·4; down 4·64+32·4
    trainable, total = parameter_counts(model)
    assert trainable == 2 * (256 + 192 + 192 + 256 + 384 + 384 + 384) == 4096
    assert total == n_base + trainable
    assert torch.equal(model(ids).logits, ref)  # B = 0: exact no-op
    assert active_adapter(model) == "default" and set(DEFAULT_TARGET_MODULES) == set(ATTN + MLP)


def test_target_modules_suffix_regex_all_linear_and_errors():
    model = apply_lora(_llama(), r=2, target_modules=["layers.0.mlp.down_proj", "v_proj"])
    assert sorted(n for n, _ in lora_modules(model)) == sorted(
        ["model.layers.0.mlp.down_proj"] + _expected_names(("v_proj",)))
    model = apply_lora(_llama(), r=2, target_modules=r".*\.1\.self_attn\.(q|k)_proj")
    assert sorted(n for n, _ in lora_modules(model)) == _expected_names(("q_proj", "k_proj"), (1,))
    model = apply_lora(_llama(), r=2, target_modules="all-linear")
    assert sorted(n for n, _ in lora_modules(model)) == _expected_names()
    model = apply_lora(_llama(), r=2, target_modules=["lm_head"])  # explicit: allowed
    assert [n for n, _ in lora_modules(model)] == ["lm_head"]

    model = _llama()
    with pytest.raises(ValueError, match=r"target_modules: .*matches none"):
        apply_lora(model, target_modules=["nope"])
    with pytest.raises(ValueError, match=r"target_modules: expected names of linear layers.*"
                                         r"model.layers.0.mlp \(LlamaMLP\)"):
        apply_lora(model, target_modules=["mlp"])
    with pytest.raises(ValueError, match="target_modules: expected a non-empty list"):
        apply_lora(model, target_modules=[])
    with pytest.raises(ValueError, match="r: expected a positive int"):
        apply_lora(model, r=0)
    assert lora_modules(model) == []  # errors changed nothing
    assert all(p.requires_grad for p in model.parameters())


def test_named_adapters_switching_and_context_managers():
    model = _llama()
    ids = _ids()
    base_logits = model(ids).logits
    apply_lora(model, r=4, alpha=8, adapter_name="policy")
    apply_lora(model, r=2, alpha=2, target_modules=["q_proj"], adapter_name="value")
    assert adapter_names(model) == ["policy", "value"]
    assert active_adapter(model) == "policy"  # adding "value" did not switch
    _randomize_b(model, "policy", seed=1)
    _randomize_b(model, "value", seed=2)
    value_only = copy.deepcopy(model)
    delete_adapter(value_only, "policy")
    set_adapter(value_only, "value")
    value_logits = value_only(ids).logits

    pol = model(ids).logits
    ptrs = [m.lora.A["policy"].data_ptr() for _, m in lora_modules(model)]
    assert (pol - base_logits).abs().max() > 1e-3
    with use_adapter(model, "value"):
        torch.testing.assert_close(model(ids).logits, value_logits, rtol=0, atol=0)
        with disable_adapters(model):
            assert torch.equal(model(ids).logits, base_logits)
    torch.testing.assert_close(model(ids).logits, pol, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with use_adapter(model, "value"), disable_adapters(model):
            raise RuntimeError("boom")
    assert active_adapter(model) == "policy"
    assert all(m.lora.enabled for _, m in lora_modules(model))
    set_adapter(model, "value")
    torch.testing.assert_close(model(ids).logits, value_logits, rtol=0, atol=0)
    assert [m.lora.A["policy"].data_ptr() for _, m in lora_modules(model)] == ptrs
    with pytest.raises(ValueError, match=r"adapter_name: expected one of the model's adapters "
                                         r"\['policy', 'value'\], got 'reward'"):
        set_adapter(model, "reward")
    with pytest.raises(ValueError, match="already exists on model.layers.0.self_attn.q_proj"):
        apply_lora(model, target_modules=["q_proj"], adapter_name="value")

    # gradients reach only the adapter that ran
    set_adapter(model, "policy")
    model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in trainable_parameters(model, "policy"))
    assert all(p.grad is None for p in trainable_parameters(model, "value"))
    assert len(trainable_parameters(model, "value")) == 4
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora." not in n)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_merge_lora_matches_unmerged(dtype, tol):
    model = _llama(dtype=dtype)
    apply_lora(model, r=4, alpha=8)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert model.model.layers[0].self_attn.q_proj.lora.A["default"].dtype == torch.float32
    _randomize_b(model)
    ids = _ids()
    logits = model(ids).logits
    assert logits.dtype == dtype
    merge_lora(model, unload=True)
    assert lora_modules(model) == [] and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    merged = model(ids).logits
    assert merged.dtype == dtype
    torch.testing.assert_close(merged.float(), logits.float(), rtol=tol, atol=tol)


def test_merge_lora_refuses_with_other_adapters():
    model = apply_lora(_llama(), r=2, adapter_name="policy")
    apply_lora(model, r=2, target_modules=["q_proj"], adapter_name="value")
    w = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match=r"other adapters \['value'\]"):
        merge_lora(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w)
    assert adapter_names(model) == ["policy", "value"]


# ---- PEFT format ---------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", ["uniform", "mixed"])
def test_kernelrl_save_then_peft_load_same_logits(tmp_path, ranks):
    peft = pytest.importorskip("peft", reason="the real PEFT checks the folder format")
    base = _llama()
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    if ranks == "mixed":  # one layer with its own r and alpha → rank_pattern / alpha_pattern
        q0 = model.model.layers[0].self_attn.q_proj
        q0.delete_adapter("default")
        q0.add_adapter("default", 2, 6)
        set_adapter(model, "default")
    _randomize_b(model)
    ids = _ids()
    logits = model(ids).logits
    assert (logits - base(ids).logits).abs().max() > 1e-3

    save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.0)
    assert sorted(cfg["target_modules"]) == sorted(DEFAULT_TARGET_MODULES)
    assert cfg["base_model_name_or_path"] == "tiny-llama" and cfg["bias"] == "none"
    if ranks == "mixed":
        assert cfg["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
        assert cfg["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 6}
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 28
    a = keys["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    assert a.shape == (4, 64) and a.dtype == torch.float32
    assert keys["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (16, 4)

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_peft_save_then_kernelrl_load_same_logits_qwen2(tmp_path):
    peft = pytest.importorskip("peft", reason="the real PEFT writes the folder")
    base = _qwen2()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"layers.1.mlp.down_proj": 2},
                             alpha_pattern={"layers.0.self_attn.v_proj": 3},
                             use_rslora=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(tmp_path))
    ids = _ids()
    peft_logits = peft_model(ids).logits

    model = load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(n for n, _ in lora_modules(model)) == _expected_names(
        ("q_proj", "v_proj", "down_proj"))
    assert model.model.layers[1].mlp.down_proj.lora.r["default"] == 2
    assert model.model.layers[0].self_attn.v_proj.lora.scaling["default"] == 3 / 2  # rsLoRA
    torch.testing.assert_close(model(ids).logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert (peft_logits - base(ids).logits).abs().max() > 1e-3

    # loaded as a second, inactive adapter next to a policy adapter on the same base
    two = apply_lora(copy.deepcopy(base), r=2, adapter_name="policy")
    load_adapter(two, tmp_path, adapter_name="reward", trainable=False)
    assert active_adapter(two) == "policy" and adapter_names(two) == ["policy", "reward"]
    assert trainable_parameters(two, "reward") == []
    with use_adapter(two, "reward"):
        torch.testing.assert_close(two(ids).logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_kernelrl_roundtrip_with_full_name_targets(tmp_path):
    base = _llama()
    model = apply_lora(copy.deepcopy(base), r=3, alpha=5,
                       target_modules=["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"])
    _randomize_b(model)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj",
                                     "model.layers.1.mlp.up_proj"]
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    ids = _ids()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def _corrupt(folder, fn):
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_load_errors_name_file_and_key(tmp_path):
    src = apply_lora(_llama(), r=4, alpha=8, target_modules=["q_proj"])
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

    def fresh_folder(name):
        save_adapter(src, tmp_path / name)
        return tmp_path / name

    missing = fresh_folder("missing")
    _corrupt(missing, lambda s: s.pop(key))
    target = _llama()
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: missing key '{key}'"):
        load_adapter(target, missing)
    assert lora_modules(target) == []  # checked before touching the model

    shape = fresh_folder("shape")
    _corrupt(shape, lambda s: s.__setitem__(key, torch.zeros(32, 5)))
    with pytest.raises(ValueError, match=rf"key '{key}': expected a floating tensor of shape "
                                         r"\(32, 4\).*got torch.float32 \(32, 5\)"):
        load_adapter(target, shape)

    extra = fresh_folder("extra")
    bad = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _corrupt(extra, lambda s: s.__setitem__(bad, torch.zeros(4, 32)))
    with pytest.raises(ValueError, match=rf"key '{bad}' is not a target module"):
        load_adapter(target, extra)

    dora = fresh_folder("dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True is a PEFT feature"):
        load_adapter(target, dora)

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(target, tmp_path / "nowhere")
    assert lora_modules(target) == []

    ok = fresh_folder("ok")
    load_adapter(target, ok)
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        load_adapter(target, ok)
    assert isinstance(target.model.layers[0].self_attn.q_proj, LoRALinear)
