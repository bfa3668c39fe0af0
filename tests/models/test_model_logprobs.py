"""kernelrl.models.logprobs against the model's own logits path.

Oracle: the same weights in float64, ``model(input_ids, attention_mask).logits`` ->
log_softmax -> gather of the shifted labels. The fp32 result must be within the fp32
target of it and within 2x the error of the same logits path run in fp32 (tests/numerics).
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config)

from numerics import check
from kernelrl.models.logprobs import scored_labels, sequence_logprobs, token_logprobs

V, H = 131, 32
TINY = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**TINY, **kw),
    "qwen2": lambda **kw: Qwen2Config(**TINY, tie_word_embeddings=True, **kw),   # tied head
    "mistral": lambda **kw: MistralConfig(**TINY, **kw),
}


def twins(family, attn="sdpa", seed=0):
    """The same random model in float32 and float64 (built in each dtype, then loaded)."""
    config = CONFIGS[family](attn_implementation=attn)
    torch.manual_seed(seed)
    m32 = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():   # larger-than-default weights: log-probs far from uniform
        for name, p in m32.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1 if "embed" in name or "lm_head" in name else 0.08)
    m64 = AutoModelForCausalLM.from_config(CONFIGS[family](attn_implementation=attn),
                                           dtype=torch.float64)
    m64.load_state_dict(m32.state_dict())
    return m32.eval(), m64.eval()


def batch(seed=1, B=3, T=9, left=False):
    """Random ids, right (or left) padding of several lengths, prompt tokens labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = [T, T - 3, T - 5][:B]
    prompts = [3, 2, 1][:B]
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        span = slice(T - n, T) if left else slice(0, n)
        mask[b, span] = 1
        labels[b, span] = ids[b, span]
        start = T - n if left else 0
        labels[b, start:start + p] = -100
    return ids, mask, labels


def logits_path(model, ids, mask, labels, temperature=1.0):
    """(logp [B, T-1], ent [B, T-1], keep [B, T-1]) from the model's full logits."""
    logits = model(ids, attention_mask=mask).logits[:, :-1] / temperature
    logp_all = logits.log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    logp = logp_all.gather(-1, target.clamp(min=0)[..., None])[..., 0] * keep
    ent = -(logp_all.exp() * logp_all).sum(-1) * keep
    return logp, ent, keep


@pytest.mark.parametrize("family", list(CONFIGS))
def test_token_logprobs_match_logits_path(family):
    m32, m64 = twins(family)
    ids, mask, labels = batch()
    out = token_logprobs(m32, ids, mask, labels)
    assert out.shape == (3, 8) and out.dtype == torch.float32
    with torch.no_grad():
        ref, _, keep = logits_path(m64, ids, mask, labels)
        eager, _, _ = logits_path(m32, ids, mask, labels)
    assert bool((out[~keep] == 0).all()), "positions not scored must be exactly 0"
    assert bool((out[keep] < 0).all())
    check("logp", out, ref, eager, torch.float32)


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradients_match_logits_path(family, reduction):
    """The mean NLL (scalar path) and a random-weighted sum of per-token log-probs (per-token
    path): every parameter's gradient against float64."""
    m32, m64 = twins(family)
    ids, mask, labels = batch(seed=2)
    weights = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))

    def loss_of(logp, keep):
        if reduction == "mean":
            return -logp.sum() / keep.sum()
        return (logp * weights).sum()

    if reduction == "mean":
        loss = -token_logprobs(m32, ids, mask, labels, reduction="mean")
    else:
        loss = (token_logprobs(m32, ids, mask, labels) * weights).sum()
    ref_logp, _, keep = logits_path(m64, ids, mask, labels)
    ref_loss = loss_of(ref_logp, keep)
    eager_logp, _, _ = logits_path(m32, ids, mask, labels)
    eager_loss = loss_of(eager_logp, keep)
    check("loss", loss.reshape(1), ref_loss.reshape(1), eager_loss.reshape(1), torch.float32)

    names = [n for n, _ in m32.named_parameters()]
    grads = torch.autograd.grad(loss, list(m32.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, list(m64.parameters()))
    eager_grads = torch.autograd.grad(eager_loss, list(m32.parameters()))
    assert len(names) == len(grads) == len(ref_grads)
    for name, g, r, e in zip(names, grads, ref_grads, eager_grads):
        assert r.norm() > 0, f"{name}: the reference gradient is zero, nothing is tested"
        check(f"grad {name}", g, r, e, torch.float32)


def test_entropy_temperature_and_sum():
    m32, m64 = twins("llama")
    ids, mask, labels = batch(seed=4)
    logp, ent = token_logprobs(m32, ids, mask, labels, temperature=0.7, return_entropy=True)
    with torch.no_grad():
        ref_logp, ref_ent, keep = logits_path(m64, ids, mask, labels, temperature=0.7)
        eager_logp, eager_ent, _ = logits_path(m32, ids, mask, labels, temperature=0.7)
    check("logp", logp, ref_logp, eager_logp, torch.float32)
    check("ent", ent, ref_ent, eager_ent, torch.float32)
    assert bool((ent[~keep] == 0).all())
    total = token_logprobs(m32, ids, mask, labels, temperature=0.7, reduction="sum")
    check("sum", total.reshape(1), ref_logp.sum().reshape(1), eager_logp.sum().reshape(1),
          torch.float32)


def test_lm_head_bias():
    m32, m64 = twins("llama")
    for model in (m32, m64):
        old = model.lm_head
        model.lm_head = nn.Linear(H, V, bias=True, dtype=old.weight.dtype)
        with torch.no_grad():
            model.lm_head.weight.copy_(old.weight)
            model.lm_head.bias.copy_(torch.linspace(-2, 2, V, dtype=old.weight.dtype))
    ids, mask, labels = batch(seed=5)
    out = token_logprobs(m32, ids, mask, labels)
    with torch.no_grad():
        ref, _, _ = logits_path(m64, ids, mask, labels)
        eager, _, _ = logits_path(m32, ids, mask, labels)
    check("logp", out, ref, eager, torch.float32)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_sequence_logprobs_sum_and_average(family):
    m32, m64 = twins(family)
    ids, mask, labels = batch(seed=6)
    with torch.no_grad():
        ref, _, keep = logits_path(m64, ids, mask, labels)
        eager, _, _ = logits_path(m32, ids, mask, labels)
    total = sequence_logprobs(m32, ids, mask, labels)
    average = sequence_logprobs(m32, ids, mask, labels, average=True)
    assert total.shape == average.shape == (3,)
    check("sum", total, ref.sum(-1), eager.sum(-1), torch.float32)
    count = keep.sum(-1)
    assert count.tolist() == [6, 4, 3]   # response tokens per row: length - prompt
    check("average", average, ref.sum(-1) / count, eager.sum(-1) / count, torch.float32)


def test_padding_is_never_scored_and_left_equals_right():
    m32, _ = twins("llama")
    ids_r, mask_r, labels_r = batch(seed=7)
    ids_l, mask_l, labels_l = batch(seed=7, left=True)
    # the same sequences in both layouts
    for b in range(3):
        n = int(mask_r[b].sum())
        ids_l[b, -n:] = ids_r[b, :n]
        labels_l[b, -n:] = labels_r[b, :n]
    right = sequence_logprobs(m32, ids_r, mask_r, labels_r)
    left = sequence_logprobs(m32, ids_l, mask_l, labels_l)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    # labels that score everything: padding (and the first real token after left padding,
    # predicted from a pad) is dropped by the mask all the same
    everything = token_logprobs(m32, ids_l, mask_l, ids_l)
    assert bool((everything[mask_l[:, 1:] == 0] == 0).all())
    assert bool((everything[mask_l[:, :-1] == 0] == 0).all())
    torch.testing.assert_close(
        everything, token_logprobs(m32, ids_l, mask_l, ids_l.masked_fill(mask_l == 0, -100))
        * (mask_l[:, :-1] == 1), rtol=0, atol=0)
    torch.testing.assert_close(
        token_logprobs(m32, ids_r, mask_r, None), token_logprobs(m32, ids_r, mask_r, ids_r),
        rtol=0, atol=0)


SEGMENTS = [[4, 3, 5], [6, 6]]     # two packed rows of 12 tokens


def packed_inputs(seed=8):
    g = torch.Generator().manual_seed(seed)
    seqs = [[torch.randint(0, V, (n,), generator=g) for n in row] for row in SEGMENTS]
    ids = torch.stack([torch.cat(row) for row in seqs])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in SEGMENTS])
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])
                       for row in SEGMENTS])
    T = ids.shape[1]
    block = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    return seqs, ids, position_ids, block[:, None]


def separate(model, seqs):
    """Each sequence on its own through the logits path, laid out as in the packed rows."""
    rows = []
    with torch.no_grad():
        for row in seqs:
            parts = []
            for s in row:
                logp, _, _ = logits_path(model, s[None], None, s[None])
                parts += [logp[0], torch.zeros(1, dtype=logp.dtype)]   # 0 at the boundary
            rows.append(torch.cat(parts)[:-1])
    return torch.stack(rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("form", ["position_ids", "bool_4d", "additive_4d"])
def test_packed_sequences_match_separate_forwards(attn, form):
    m32, m64 = twins("mistral", attn=attn)
    seqs, ids, position_ids, block = packed_inputs()
    if form == "position_ids":
        mask = None
    elif form == "bool_4d":
        mask = block
    else:
        mask = torch.zeros(block.shape).masked_fill(~block, torch.finfo(torch.float32).min)
    out = token_logprobs(m32, ids, mask, position_ids=position_ids)
    check("packed logp", out, separate(m64, seqs), None, torch.float32)
    total = sequence_logprobs(m32, ids, mask, ids, position_ids=position_ids)
    check("packed sum", total, separate(m64, seqs).sum(-1), None, torch.float32)


def test_4d_mask_marks_sequence_starts_without_position_ids():
    # with a 4-D mask alone, a token that cannot see its predecessor is never scored
    _, ids, position_ids, block = packed_inputs()
    shifted = scored_labels(ids, block, None, None)
    assert shifted.tolist() == scored_labels(ids, None, None, position_ids).tolist()
    assert (shifted == -100).sum(-1).tolist() == [2, 1]


def test_lm_head_only_sees_scored_rows():
    """Prompt and padding rows are not multiplied by the lm_head (no [B·T, V] matmul)."""
    m32, _ = twins("llama")
    ids, mask, labels = batch(seed=9)
    scored = int((scored_labels(ids, mask, labels) != -100).sum())
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm,
                                       torch.ops.aten.matmul, torch.ops.aten.bmm):
                if isinstance(out, torch.Tensor) and out.shape[-1] == V:
                    shapes.append(tuple(out.shape))
            return out

    with torch.no_grad(), Record():
        token_logprobs(m32, ids, mask, labels)
    assert shapes, "no matmul with V columns was seen: the test checks nothing"
    assert all(s[0] <= scored for s in shapes), (shapes, scored)


def test_errors_name_the_argument():
    m32, _ = twins("llama")
    ids, mask, labels = batch()
    with pytest.raises(TypeError, match="input_ids"):
        token_logprobs(m32, ids.float(), mask)
    with pytest.raises(ValueError, match="attention_mask"):
        token_logprobs(m32, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(m32, ids, mask, labels[:2])
    with pytest.raises(ValueError, match="reduction"):
        token_logprobs(m32, ids, mask, reduction="avg")
    with pytest.raises(ValueError, match="position_ids"):
        token_logprobs(m32, ids, None, position_ids=torch.arange(4)[None])


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    from kernelrl.models.hf import check_supported

    m32, m64 = twins("llama")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    p32 = peft.get_peft_model(m32, lora)
    ids, mask, labels = batch(seed=10)
    out = token_logprobs(p32, ids, mask, labels)
    with torch.no_grad():
        eager, _, _ = logits_path(p32, ids, mask, labels)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    lora_grads = [p.grad for n, p in p32.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.norm() > 0 for g in lora_grads)
    # an adapted lm_head would be skipped by hidden @ weight.T: refused
    _, other = twins("llama")
    adapted = peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="plain nn.Linear, got peft"):
        check_supported(adapted)
