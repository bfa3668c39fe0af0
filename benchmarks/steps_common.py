"""What the cases of the steps family (bench_steps.py: SFT and DPO; steps_ppo.py: PPO;
steps_qlora.py: QLoRA; steps_moe.py: MoE) share: the model and its settings, LoRA adapters
that start the same under kernelrl's LoRA and PEFT, one naming of the trainable parameters
across both, the rows' loss and optimizer-step pieces (kernelrl: the trainers' calls;
eager: plain torch), TRL's word-level tokenizer, the CPU thread pinning, and the check's
comparison of one row's step with eager's.

Shape keys: H hidden, I MLP width, L layers (H/64 heads, as many KV heads), V vocabulary;
the sequence length is T (SFT) or Tp + Tr (prompt + response: DPO, PPO).
"""

from __future__ import annotations

import math
import os
import re
import zlib

import common

MODEL_FULL = {"H": 256, "I": 688, "L": 4, "V": 32000}
MODEL_QUICK = {"H": 128, "I": 344, "L": 2, "V": 8000}
THREADS = 2
LORA_R, LORA_ALPHA = 16, 16.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, MAX_GRAD_NORM, SEED = 1e-4, 1.0, 0
TOTAL_STEPS = 1000               # the schedules' length: the lr stays ~1e-4 over a run
PAD, EOS, FIRST_ID = 0, 1, 3     # token ids; data ids are drawn from [FIRST_ID, V)
LOSS_ATOL, LOSS_RTOL, PARAM_TOL = 1e-4, 1e-5, 1e-3


def threads() -> int:
    """Intra-op threads of a step on a CPU: THREADS, or the cores there are if fewer."""
    return min(THREADS, os.cpu_count() or 1)


def llama(shape: dict, device: str):
    """The same LlamaForCausalLM every time: fp32, seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    T = shape["T"] if "T" in shape else shape["Tp"] + shape["Tr"]
    config = LlamaConfig(
        vocab_size=shape["V"], hidden_size=shape["H"], intermediate_size=shape["I"],
        num_hidden_layers=shape["L"], num_attention_heads=shape["H"] // 64,
        num_key_value_heads=shape["H"] // 64, max_position_embeddings=max(T, 128),
        tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS)
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.float32)


def peft_lora(model, adapter_name: str = "default"):
    """``model`` under PEFT's LoRA with the family's settings (adapter ``adapter_name``)."""
    from peft import get_peft_model
    return get_peft_model(model, peft_config(), adapter_name=adapter_name)


def peft_config():
    from peft import LoraConfig
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")


def canonical(name: str) -> str:
    """A parameter's name, the same under kernelrl's LoRA, PEFT and none: LoRA matrices as
    '<module>.A' / '<module>.B' for the adapter 'default', '<module>.<adapter>.A' / ...B
    for any other (PPO's 'policy', 'reward', 'value')."""
    def adapter(m):
        return f".{m[1]}" if m[2] == "default" else f".{m[2]}.{m[1]}"

    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.lora_([AB])\.(\w+)\.weight$", adapter, name)    # PEFT
    name = re.sub(r"\.lora\.([AB])\.(\w+)$", adapter, name)           # kernelrl
    return re.sub(r"\.(base_layer|base)\.", ".", name)


def trainable(model) -> list:
    """The trainable parameters, sorted by canonical name: the order every row returns."""
    named = sorted((canonical(n), p) for n, p in model.named_parameters() if p.requires_grad)
    return [p for _, p in named]


def init_adapters(model, b_scale: float = 0.0) -> None:
    """Every LoRA A ~ U(±1/√H_in) from a generator seeded by its canonical name, so that
    kernelrl's LoRA and PEFT start from the same adapters; B = 0 as both initialise it, or
    with ``b_scale`` > 0, B ~ U(±b_scale/√R) seeded the same way (an adapter that already
    changes the model)."""
    import torch

    for name, p in model.named_parameters():
        key = canonical(name)
        if not key.endswith((".A", ".B")) or (key.endswith(".B") and not b_scale):
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        bound = (1.0 if key.endswith(".A") else b_scale) / math.sqrt(p.shape[1])
        with torch.no_grad():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1).mul_(bound))


def kernelrl_finish(model):
    """``finish(loss, *logged)``: the end of a kernelrl row's step as the trainers run it
    (kernelrl/train/sft.py, dpo.py): backward, clip_gradients (MAX_GRAD_NORM), the step's
    one host sync (the loss, the logged values, the norm), AdamW step (build_optimizer, LR),
    warmup_cosine scheduler step, zero_grad; returns (loss, *trainable(model))."""
    import torch
    from kernelrl.train.common import (build_optimizer, clip_gradients, trainable_parameters,
                                       warmup_cosine)

    params, out = trainable_parameters(model), trainable(model)
    optimizer = build_optimizer(model, lr=LR)
    scheduler = warmup_cosine(optimizer, warmup_steps=0, total_steps=TOTAL_STEPS)

    def finish(loss, *logged):
        loss.backward()
        norm = clip_gradients(params, MAX_GRAD_NORM)
        torch.stack([loss.detach(), *logged, norm.float()]).tolist()    # the one host sync
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return (loss.detach().reshape(1), *out)

    return finish


def kernelrl_sft_loss(model, batch):
    """The SFT trainer's loss of a step of one micro-batch (kernelrl/train/sft.py):
    -token_logprobs(..., reduction="sum") / N, N the batch's label tokens."""
    from kernelrl.models.logprobs import token_logprobs

    inputs = batch.model_inputs(mask="position_ids")
    return -token_logprobs(model, batch.input_ids, inputs["attention_mask"], batch.labels,
                           position_ids=batch.position_ids,
                           reduction="sum") / max(batch.num_label_tokens, 1)


def eager_finish(model):
    """``finish(loss)``: the end of an eager row's step: backward, clip_grad_norm_
    (MAX_GRAD_NORM), torch AdamW step (LR, no weight decay), zero_grad; returns (loss,
    *trainable(model))."""
    import torch

    out = trainable(model)
    optimizer = torch.optim.AdamW(out, lr=LR, weight_decay=0.0)

    def finish(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(out, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (loss.detach().reshape(1), *out)

    return finish


def logits_logps(logits, labels):
    """([B, T-1] log-probs of the next tokens from the full logits [B, T, V], 0 where not
    scored; the scored mask): log_softmax and gather, as an eager user writes it."""
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    return logp.squeeze(-1) * mask, mask


def eager_token_logps(model, input_ids, attention_mask, labels):
    """``logits_logps`` of ``model``'s full logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits_logps(logits, labels)


def eager_sft_loss(logits, labels):
    """The masked mean token NLL from the full logits."""
    logp, mask = logits_logps(logits, labels)
    return -logp.sum() / mask.sum()


def initial_parameters(build):
    """p_0 for ``compare_step``: a function giving ``trainable(build())``'s values, the
    model built and copied at its first call only."""
    got = []

    def get():
        if not got:
            got.extend(p.detach().clone() for p in trainable(build()))
        return got

    return get


SPECIAL = {PAD: "<pad>", EOS: "</s>", 2: "<unk>"}


def word(i: int) -> str:
    return SPECIAL.get(i, f"t{i}")


def word_tokenizer(vocab: int):
    """TRL's tokenizer: token id i is the word 't<i>' (0, 1, 2: <pad>, </s>, <unk>; special
    words are matched anywhere in a text, so none may be the prefix of another): text of
    such words tokenizes back to exactly the ids it was written from."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=word(PAD),
                                   eos_token=word(EOS), unk_token="<unk>")


def draw_ids(g, n: int, vocab: int) -> list:
    """n token ids from [FIRST_ID, vocab), drawn from the generator ``g``."""
    import torch
    return torch.randint(FIRST_ID, vocab, (n,), generator=g).tolist()


def pinned(step, device: str):
    """On a CPU the step runs with THREADS intra-op threads (the issue's setting)."""
    import torch

    if common.is_cuda(device):
        return step

    def run(x):
        before = torch.get_num_threads()
        torch.set_num_threads(threads())
        try:
            return step(x)
        finally:
            torch.set_num_threads(before)

    return run


def missing(*modules: str) -> str | None:
    """Why a row cannot run here (a module not installed), or None."""
    import importlib.util
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return f"not installed: {', '.join(absent)} (pip install {' '.join(absent)})"


def compare_step(out, ref, initial, who: str = "eager") -> str | None:
    """None if the step ``out`` = (loss, *parameters after it) agrees with the reference
    row ``who``'s ``ref`` (the same layout; eager's, or bnb_peft's for QLoRA), else why
    not: the losses within LOSS_ATOL + LOSS_RTOL·|loss|, then ||p - p_ref|| <=
    PARAM_TOL·||p_ref - p_0|| over all the parameters. ``initial()`` gives p_0, the
    parameters before the step (called only when the losses agree)."""
    if len(out) != len(ref):
        return f"returned {len(out) - 1} parameters, {who} {len(ref) - 1}"
    loss, loss_ref = out[0].item(), ref[0].item()
    if not abs(loss - loss_ref) <= LOSS_ATOL + LOSS_RTOL * abs(loss_ref):
        return f"loss {loss:.7g} vs {who} {loss_ref:.7g}"
    for p, q in zip(out[1:], ref[1:]):
        if p.shape != q.shape:
            return f"parameter shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}"
    diff = math.sqrt(sum(float((p.double() - q.double()).pow(2).sum())
                         for p, q in zip(out[1:], ref[1:])))
    update = math.sqrt(sum(float((q.double() - p0.double()).pow(2).sum())
                           for q, p0 in zip(ref[1:], initial())))
    if not (math.isfinite(diff) and diff <= PARAM_TOL * update):
        return (f"parameters after one step differ from {who}'s by {diff:.3g} (L2), "
                f"more than {PARAM_TOL:g} x {who}'s update {update:.3g}")
    return None
