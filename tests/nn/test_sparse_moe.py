"""SparseMoE against transformers' own sparse MoE blocks (Mixtral, Qwen3-MoE): outputs and
gradients, both weight layouts (transformers 5's stacked experts; transformers 4's per-expert
MLPs, built here by hand as transformers 5 no longer ships them), jitter, autocast, the
auxiliary losses against ``load_balancing_loss_func``, and the errors."""

import copy

import pytest
import torch
from torch import nn
from transformers import MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral import modeling_mixtral
from transformers.models.qwen3_moe import modeling_qwen3_moe

from backends import use_backend
from kernelrl.nn import SparseMoE
from numerics import check, rel_err

D, F = 24, 20


def _mixtral_block(E=4, K=2, jitter=0.0, seed=0):
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=K, router_jitter_noise=jitter)
    cfg._experts_implementation = "eager"
    return _init(modeling_mixtral.MixtralSparseMoeBlock(cfg), seed)


def _qwen3_block(E=8, K=2, norm=True, seed=0):
    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                         num_experts_per_tok=K, norm_topk_prob=norm)
    cfg._experts_implementation = "eager"
    return _init(modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg), seed)


def _init(block, seed):
    """Weights of a size where routing is decisive (no near-ties) and outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        block.gate.weight.mul_(4.0)
    return block


BLOCKS = {
    "mixtral-E4": lambda: _mixtral_block(E=4),
    "mixtral-E8": lambda: _mixtral_block(E=8, seed=1),
    "qwen3-E4": lambda: _qwen3_block(E=4, seed=2),
    "qwen3-E8": lambda: _qwen3_block(E=8, seed=3),
    "qwen3-E8-top4-raw": lambda: _qwen3_block(E=8, K=4, norm=False, seed=4),
}


def _weights(module):
    """(router [E, D], gate_up [E, 2F, D], down [E, D, F]) of a HF block or a SparseMoE."""
    return module.gate.weight, module.experts.gate_up_proj, module.experts.down_proj


def _run(module, x, dy):
    """(y, [dx, d router, d gate_up, d down]) for upstream gradient dy."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    grads = torch.autograd.grad(y, (x, *_weights(module)), dy)
    return y, grads


@pytest.mark.parametrize("kind", sorted(BLOCKS))
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_from_hf_matches_the_block_fp32(kind, backend, monkeypatch):
    use_backend(monkeypatch, backend, "cpu", op="moe_ffn")
    block = BLOCKS[kind]()
    ref64 = copy.deepcopy(block).double()
    moe = SparseMoE.from_hf(copy.deepcopy(block))
    assert moe.top_k == block.gate.top_k and moe.num_experts == block.gate.weight.shape[0]
    assert moe.renormalize == getattr(block.gate, "norm_topk_prob", True)
    torch.manual_seed(5)
    x, dy = torch.randn(3, 7, D), torch.randn(3, 7, D)
    y, grads = _run(moe, x, dy)
    y32, grads32 = _run(block, x, dy)
    y64, grads64 = _run(ref64, x.double(), dy.double())
    assert y.dtype == torch.float32 and y.shape == x.shape
    check(f"{kind} y", y, y64, y32, torch.float32)
    for name, g, g32, g64 in zip(("dx", "d router", "d gate_up", "d down"), grads, grads32,
                                 grads64):
        check(f"{kind} {name}", g, g64, g32, torch.float32)


def test_from_hf_shares_the_stacked_parameters_and_keeps_their_names_and_order():
    for block in (_mixtral_block(), _qwen3_block()):
        moe = SparseMoE.from_hf(block)
        for mine, theirs in zip(_weights(moe), _weights(block)):
            assert mine is theirs                       # taken over, not copied
        assert [n for n, _ in moe.named_parameters()] == [n for n, _ in block.named_parameters()]
        assert moe.router_weight is moe.gate.weight and moe.w_gate_up is moe.experts.gate_up_proj
        assert moe.w_down is moe.experts.down_proj
    assert SparseMoE.from_hf(_mixtral_block()).float32_weights            # v5 Mixtral
    assert not SparseMoE.from_hf(_qwen3_block()).float32_weights


# ---- transformers 4's per-expert layout (stand-ins with its class and attribute names) ----

class _Expert(nn.Module):
    """A v4 expert MLP: Mixtral's w1 (gate) / w3 (up) / w2 (down) or Qwen3-MoE's
    gate_proj / up_proj / down_proj, each an nn.Linear without bias."""

    def __init__(self, names, gate, up, down):
        super().__init__()
        for name, w in zip(names, (gate, up, down)):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = nn.Parameter(w.detach().clone())
            setattr(self, name, lin)
        self.act_fn = nn.SiLU()


def _v4_block(block, cls_name, names, **attributes):
    """A transformers 4 style block (class ``cls_name``, router an nn.Linear, experts a
    ModuleList) holding ``block``'s weights."""
    router, gate_up, down = _weights(block)
    v4 = type(cls_name, (nn.Module,), {})()
    v4.gate = nn.Linear(router.shape[1], router.shape[0], bias=False)
    v4.gate.weight = nn.Parameter(router.detach().clone())
    v4.experts = nn.ModuleList(_Expert(names, gu[:F], gu[F:], d) for gu, d in zip(gate_up, down))
    for key, value in attributes.items():
        setattr(v4, key, value)
    return v4


@pytest.mark.parametrize("family", ["mixtral", "qwen3"])
def test_from_hf_stacks_the_transformers_4_layout(family):
    if family == "mixtral":
        block = _mixtral_block(E=8, seed=6)
        v4 = _v4_block(block, "MixtralSparseMoeBlock", ("w1", "w3", "w2"), top_k=2,
                       jitter_noise=0.0, num_experts=8)
    else:
        block = _qwen3_block(E=8, K=4, norm=False, seed=7)
        v4 = _v4_block(block, "Qwen3MoeSparseMoeBlock", ("gate_proj", "up_proj", "down_proj"),
                       top_k=4, norm_topk_prob=False, num_experts=8)
    moe = SparseMoE.from_hf(v4)
    assert not moe.float32_weights                # v4 casts the routing weights (fp32: same)
    assert moe.top_k == block.gate.top_k and moe.renormalize == (family == "mixtral")
    for mine, theirs in zip(_weights(moe), _weights(block)):
        assert torch.equal(mine, theirs) and mine is not theirs
    assert moe.w_gate_up.requires_grad
    torch.manual_seed(8)
    x, dy = torch.randn(2, 9, D), torch.randn(2, 9, D)
    (y, grads), (y_ref, grads_ref) = _run(moe, x, dy), _run(block, x, dy)
    assert rel_err(y, y_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5


def test_jitter_draws_what_mixtral_draws_in_training_only():
    block = _mixtral_block(jitter=0.1, seed=9).train()
    moe = SparseMoE.from_hf(copy.deepcopy(block))
    assert moe.jitter_noise == 0.1 and moe.training
    x = torch.randn(2, 5, D)
    torch.manual_seed(10)
    y = moe(x)
    torch.manual_seed(10)
    y_ref = block(x.clone())                       # HF multiplies its input in place
    assert rel_err(y, y_ref) < 1e-5
    torch.manual_seed(10)
    assert not torch.equal(moe(x), moe.eval()(x))  # noise in training, none in eval
    assert torch.equal(moe(x), moe(x))
    assert rel_err(moe(x), block.eval()(x.clone())) < 1e-5


def test_bf16_and_autocast_stay_within_bf16_error():
    block = _mixtral_block(E=8, seed=11)
    ref64 = copy.deepcopy(block).double()
    x = torch.randn(4, 6, D)
    y64 = ref64(x.double())
    # bf16 weights and activations: HF keeps Mixtral's routing weights in float32 too.
    moe = SparseMoE.from_hf(copy.deepcopy(block).to(torch.bfloat16))
    y = moe(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and rel_err(y, y64) < 1e-2
    # fp32 weights under bf16 autocast: the experts run in bf16, y comes back in fp32.
    moe = SparseMoE.from_hf(copy.deepcopy(block))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        y_hf = block(x.clone())
    assert y.dtype == torch.float32 and rel_err(y, y64) < 1e-2
    assert rel_err(y, y64) <= 2 * rel_err(y_hf, y64) + 1e-3


def test_standalone_module_shapes_init_and_gradients():
    torch.manual_seed(12)
    moe = SparseMoE(D, F, 6, top_k=3, renormalize=False)
    assert moe.router_weight.shape == (6, D) and moe.w_gate_up.shape == (6, 2 * F, D)
    assert moe.w_down.shape == (6, D, F)
    assert moe.w_down.abs().max() <= F ** -0.5 and moe.w_gate_up.abs().max() <= D ** -0.5
    x = torch.randn(5, D, requires_grad=True)
    y = moe(x)
    assert y.shape == (5, D)
    assert moe.last_router_logits.shape == (5, 6) and moe.last_experts.shape == (5, 3)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.parameters())
    assert "top_k=3" in repr(moe)


# ---- the auxiliary losses ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mixtral-E8", "qwen3-E8-top4-raw"])
def test_aux_losses_match_transformers_for_one_layer(kind):
    block = BLOCKS[kind]()
    moe = SparseMoE.from_hf(copy.deepcopy(block))
    E, K = moe.num_experts, moe.top_k
    x = torch.randn(3, 8, D)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, 6:] = 0
    moe(x)
    logits_hf, _, _ = block.gate(x.reshape(-1, D))            # what the HF recorder keeps
    for m in (None, mask):
        ours = moe.load_balancing_loss(m)
        theirs = modeling_mixtral.load_balancing_loss_func((logits_hf,), E, K, m)
        assert rel_err(K * ours, theirs) < 1e-6            # HF's one-layer value is K times
        (g,) = torch.autograd.grad(ours, moe.router_weight, retain_graph=True)
        (g_ref,) = torch.autograd.grad(theirs, block.gate.weight, retain_graph=True)
        assert rel_err(K * g, g_ref) < 1e-5                # trains the router the same way
    keep = mask.reshape(-1).bool()
    z_ref = torch.logsumexp(logits_hf[keep], dim=-1).square().mean()
    assert rel_err(moe.z_loss(mask), z_ref) < 1e-6


def test_the_last_forward_is_the_one_read():
    moe = SparseMoE(D, F, 4)
    with pytest.raises(ValueError, match="no forward has run yet"):
        moe.load_balancing_loss()
    with pytest.raises(ValueError, match="no forward has run yet"):
        moe.z_loss()
    moe(torch.randn(6, D))
    first = moe.load_balancing_loss()
    assert first.requires_grad
    with torch.no_grad():
        moe(torch.randn(2, 3, D))
    assert moe.last_router_logits.shape == (6, 4) and not moe.last_router_logits.requires_grad
    assert not torch.equal(moe.load_balancing_loss(), first)


# ---- errors --------------------------------------------------------------------------------

def test_errors_name_the_argument_or_the_block_type():
    with pytest.raises(ValueError, match=r"top_k: expected an int in \[1, min\(8, num_experts"):
        SparseMoE(D, F, 2, top_k=3)
    with pytest.raises(ValueError, match="hidden_size: expected an int >= 1"):
        SparseMoE(0, F, 4)
    with pytest.raises(ValueError, match=r"jitter_noise: expected a number in \[0, 1\)"):
        SparseMoE(D, F, 4, jitter_noise=1.5)
    with pytest.raises(ValueError, match=r"SparseMoE: hidden: expected \[..., D = 24\]"):
        SparseMoE(D, F, 4)(torch.randn(3, D + 1))

    class OlmoeSparseMoeBlock(nn.Module):
        pass
    with pytest.raises(ValueError, match="got OlmoeSparseMoeBlock"):
        SparseMoE.from_hf(OlmoeSparseMoeBlock())

    block = _mixtral_block()
    block.experts = nn.Identity()
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock's .experts is a Identity"):
        SparseMoE.from_hf(block)
    block = _qwen3_block()
    block.experts.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="Qwen3MoeSparseMoeBlock's experts use the activation"):
        SparseMoE.from_hf(block)
    block = _qwen3_block()
    block.experts.is_transposed = True
    with pytest.raises(ValueError, match="is_transposed=True"):
        SparseMoE.from_hf(block)
    v4 = _v4_block(_qwen3_block(), "Qwen3MoeSparseMoeBlock",
                   ("gate_proj", "up_proj", "down_proj"), top_k=2)
    with pytest.raises(ValueError, match="does not say its norm_topk_prob"):
        SparseMoE.from_hf(v4)


@pytest.mark.gpu
def test_mixtral_block_bf16_on_the_gpu():
    device = "cuda"
    block = _mixtral_block(E=8, seed=13).to(device)
    ref64 = copy.deepcopy(block).double()
    moe = SparseMoE.from_hf(copy.deepcopy(block).to(torch.bfloat16))
    x, dy = torch.randn(64, D, device=device), torch.randn(64, D, device=device)
    y, grads = _run(moe, x.to(torch.bfloat16), dy.to(torch.bfloat16))
    y64, grads64 = _run(ref64, x.double(), dy.double())
    assert rel_err(y, y64) < 1e-2
    for g, g64 in zip(grads, grads64):
        assert rel_err(g, g64) < 1e-2
