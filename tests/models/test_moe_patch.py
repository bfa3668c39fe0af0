"""patch_moe on tiny Mixtral and Qwen3-MoE causal LMs: the blocks replaced by type, logits
and loss gradients as the unpatched model's, router_aux_loss as transformers' aux term
(``output_router_logits=True``), save_pretrained unchanged, LoRA and gradient checkpointing
over the patched blocks, and the refusals."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from kernelrl.models import (apply_lora, config_router_aux_coef, lora_modules, moe_modules,
                             patch_moe, router_aux_loss)
from kernelrl.models.moe import hf_moe_blocks
from kernelrl.nn import SparseMoE
from numerics import rel_err

V = 40


def _mixtral():
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=24, num_local_experts=4,
                        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, initializer_range=0.2, router_aux_loss_coef=0.02)
    return MixtralForCausalLM(cfg)


def _qwen3():
    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                         moe_intermediate_size=16, num_experts=8, num_experts_per_tok=4,
                         norm_topk_prob=False, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, mlp_only_layers=[1],
                         initializer_range=0.2, router_aux_loss_coef=0.05)
    return Qwen3MoeForCausalLM(cfg)


MODELS = {"mixtral": (_mixtral, ["model.layers.0.mlp", "model.layers.1.mlp"],
                      "MixtralSparseMoeBlock"),
          "qwen3_moe": (_qwen3, ["model.layers.0.mlp", "model.layers.2.mlp"],
                        "Qwen3MoeSparseMoeBlock")}


def _batch(seed=2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                    # left padding
    mask[2, 7:] = 0                    # right padding
    return ids, mask


def _grads(model, loss):
    """name -> gradient of every parameter that gets one."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_patched_model_matches_transformers(family):
    build, names, kind = MODELS[family]
    model = build()
    ref = copy.deepcopy(model)
    assert patch_moe(model) == [(n, kind) for n in names]
    assert [n for n, _ in moe_modules(model)] == names and not hf_moe_blocks(model)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert patch_moe(model) == []                              # already patched

    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask)
    ref_out = ref(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    assert rel_err(out.logits, ref_out.logits) < 1e-5

    # transformers' loss is CE + router_aux_loss_coef · aux with output_router_logits=True
    coef = config_router_aux_coef(model)
    assert coef == model.config.router_aux_loss_coef > 0
    aux = router_aux_loss(model, mask)
    assert rel_err(aux, ref_out.aux_loss) < 1e-6
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    loss = ce + coef * aux
    assert rel_err(loss, ref_out.loss) < 1e-6
    router = names[0] + ".gate.weight"       # the aux term reaches the routers
    (aux_only,) = torch.autograd.grad(aux, model.get_parameter(router), retain_graph=True)
    assert aux_only.abs().sum() > 0
    grads, ref_grads = _grads(model, loss), _grads(ref, ref_out.loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_aux_loss_pools_the_layers_as_transformers_not_a_mean_of_layers():
    model = _qwen3()
    patch_moe(model)
    ids, mask = _batch(3)
    model(ids)
    layers = [m for _, m in moe_modules(model)]
    pooled = router_aux_loss(model)
    per_layer = torch.stack([m.load_balancing_loss() for m in layers])
    K = layers[0].top_k
    assert not torch.allclose(pooled, K * per_layer.mean())    # a product of pooled means
    assert 0 < pooled <= K * len(layers[0].last_router_logits[0])
    with pytest.raises(ValueError, match=r"mask: expected the last forward's N = 27 tokens"):
        router_aux_loss(model, mask[:, :5])


def test_save_pretrained_writes_the_unpatched_files_and_loads_back(tmp_path):
    model = _mixtral()
    ref = copy.deepcopy(model)
    patch_moe(model)
    model.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "ref")
    a = load_file(tmp_path / "patched" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "patched")
    ids, mask = _batch()
    assert torch.equal(back(ids, attention_mask=mask).logits,
                       ref(ids, attention_mask=mask).logits)


def test_patch_takes_over_the_parameters_without_copies():
    model = _mixtral()
    before = {n: p for n, p in model.named_parameters()}
    patch_moe(model)
    assert all(p is before[n] for n, p in model.named_parameters())


def test_lora_over_patched_blocks_leaves_the_experts_and_routers_frozen():
    model = _qwen3()
    patch_moe(model)
    apply_lora(model, r=4, target_modules="all-linear")
    wrapped = [n for n, _ in lora_modules(model)]
    assert "model.layers.1.mlp.gate_proj" in wrapped          # the dense layer's MLP
    assert not any(".mlp.gate" == n[-9:] or "experts" in n for n in wrapped)
    for _, moe in moe_modules(model):
        assert not any(p.requires_grad for p in moe.parameters())
    ids, mask = _batch()
    model(ids, attention_mask=mask).logits.sum().backward()
    assert all(p.grad is None for _, m in moe_modules(model) for p in m.parameters())


def test_gradient_checkpointing_keeps_the_aux_gradients():
    model = _mixtral()
    patch_moe(model)
    twin = copy.deepcopy(model)
    twin.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = _batch(4)
    grads = []
    for m in (model, twin):
        m.train()
        logits = m(ids, attention_mask=mask).logits
        loss = logits.logsumexp(-1).mean() + 0.5 * router_aux_loss(m, mask)
        grads.append(_grads(m, loss))
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) < 1e-6, name


def test_dense_models_are_left_alone_and_unknown_blocks_refused():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    assert patch_moe(llama) == [] and config_router_aux_coef(llama) == 0.0
    with pytest.raises(ValueError, match="has no SparseMoE layers"):
        router_aux_loss(llama)

    class SharedExpertMoeBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.experts = nn.Linear(4, 2), nn.ModuleList()

    model = _mixtral()
    model.model.layers[1].mlp = SharedExpertMoeBlock()
    with pytest.raises(ValueError, match=r"model.layers.1.mlp \(SharedExpertMoeBlock\) look "
                                         r"like mixture-of-experts blocks"):
        patch_moe(model)
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"   # untouched
    with pytest.raises(ValueError, match="model: expected an nn.Module"):
        patch_moe("model")

    model = _mixtral()
    model.model.layers[1].mlp.experts.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="model: model.layers.1.mlp: block: "
                                         "MixtralSparseMoeBlock's experts use the activation"):
        patch_moe(model)
    assert not moe_modules(model)                             # nothing replaced


def test_router_aux_loss_needs_a_forward():
    model = _mixtral()
    patch_moe(model)
    with pytest.raises(ValueError, match="has not run a forward yet"):
        router_aux_loss(model)
    assert isinstance(model.model.layers[0].mlp, SparseMoE)
