"""Benchmark: one whole training step (SFT, DPO) of a small Llama: kernelrl vs eager vs TRL.

Shape legend: B sequences, T tokens per sequence (SFT); P pairs, Tp prompt and Tr response
tokens per sequence (DPO: 2·P sequences of Tp + Tr); H hidden, I MLP width, L layers
(H/64 heads, as many KV heads), V vocabulary; tok = tokens in the step's batch; thr =
torch intra-op threads during the step (CPU: 2, or the cores there are if fewer).

Target shapes (--full): H=256 I=688 L=4 V=32000, fp32; SFT B=8 T=512 (4,096 tokens, every
token but the first of each row scored); DPO P=8 Tp=256 Tr=256 (16 sequences, 8,192 tokens,
the response tokens scored). Default (light) shapes: H=128 I=344 L=2 V=8000, SFT B=2 T=128,
DPO P=1 Tp=64 Tr=64, cases "sft" and "dpo_lora" only. No padding in either.

Every row trains the same model from the same initial weights (LlamaForCausalLM of that
config under torch.manual_seed(0); LoRA r=16 alpha=16 on q,k,v,o,gate,up,down with the same
deterministic A, B = 0), AdamW lr 1e-4 (betas 0.9/0.999, eps 1e-8, no weight decay),
gradient norm clipped to 1.0, DPO beta 0.1 (sigmoid loss), transformers' default attention
(sdpa), no gradient checkpointing, no dropout. What one timed call is:

  kernelrl  the trainers' own calls (kernelrl/train/sft.py, dpo.py). SFT: -token_logprobs(
            model, input_ids, attention_mask, labels, position_ids=..., reduction="sum") / N,
            backward, clip_gradients, the step's one host sync, AdamW step, warmup_cosine
            scheduler step, zero_grad. DPO: reference_logps (full: a frozen copy of the
            initial model, the trainer's --ref copy; LoRA: the policy with its adapters
            off) + dpo_step_loss + backward + clip_gradients + host sync + AdamW step +
            scheduler step + zero_grad. Model set up by kernelrl.train.common.make_trainable
            (kernelrl's LoRA), optimizer by build_optimizer.
  eager     the same step as plain torch + transformers (+ PEFT for LoRA): full logits
            model(...).logits, log_softmax, gather, masked mean (SFT) or summed response
            log-probs and -logsigmoid(beta·((c - c_ref) - (r - r_ref))) averaged over pairs
            (DPO; the reference forward under no_grad the same way: a frozen copy, or the
            PEFT model under disable_adapter()), backward, clip_grad_norm_, torch AdamW step,
            zero_grad.
  trl       TRL's SFTTrainer / DPOTrainer (fp32, gradient_checkpointing=False, no logging,
            saving or eval; the full-DPO reference a frozen copy passed as ref_model; LoRA
            by peft_config) built on an in-memory datasets.Dataset of the same token ids
            (SFT: input_ids + labels; DPO: the ids written as words of a word-level
            tokenizer, so that TRL's own tokenization gives them back), and the first batch
            of trainer.get_train_dataloader() (collated once, before timing). One call is
            what transformers' Trainer loop does per optimizer step, by its public pieces:
            trainer.training_step(model, inputs, num_items_in_batch) (TRL's compute_loss:
            forward with its fused chunked LM head, loss, metrics, backward), then
            accelerator.clip_grad_norm_(max_grad_norm), the norm read as a float,
            optimizer.step(), lr_scheduler.step(), model.zero_grad(); optimizer and
            scheduler from trainer.create_optimizer_and_scheduler, passed through
            accelerator.prepare with the model, as Trainer.train() does. Not timed: the
            trainer's setup, data loading and collation, callbacks and logging.

The batch is built before timing for every row (kernelrl.train.batching.collate_sft /
collate_preferences; TRL: its own collator). Tokens/s = tok / median step time; the target
lines print it for every row. flops (for TFLOP/s and % of the fp32 matmul ceiling): linear
layers and lm_head over every position, attention as T² per layer (no causal halving);
backward twice the forward for full fine-tuning, once for LoRA (no gradients for frozen
weights; LoRA's own flops not counted); DPO adds the reference forward. The same count for
every row of a case, so the rate ranks like time.

Check before timing: every row takes one step from the same start on the same batch;
its loss must equal eager's (|diff| <= 1e-4 + 1e-5·|loss|) and its trainable parameters
afterwards must agree with eager's to 0.1% of eager's update: ||p - p_eager|| <= 1e-3 ·
||p_eager - p_0|| over all trainable parameters.

Peak memory (CPU; a fresh process per row, median of 3 with --full): extra = peak RSS
(VmHWM) over one warm-up step and one measured step - RSS once the model(s), optimizer (no
state yet) and batch are built (TRL: the whole trainer) - code paged in meanwhile. So the
extra is what training steps add to the model and data: gradients, AdamW's two moment
buffers (allocated by the first step), activations, logits or chunks of them, and what the
allocator keeps. GPU: max_memory_allocated during one step after the timed ones minus
memory_allocated before it (AdamW state already allocated, so not in the figure).

Targets (printed MET / NOT MET / NOT CHECKED with the numbers, never asserted):
  CPU  every kernelrl row at the target shapes (SFT full, SFT LoRA, DPO full, DPO LoRA):
       tokens/s at least eager's (median of >= 5 paired round-robin rounds) and extra
       memory at most 1/2 of eager's.
  GPU  kernelrl DPO (full and LoRA) at least 1.5x TRL's tokens/s at most 1/2 of TRL's peak
       memory (the same shapes; NOT CHECKED on a CPU run).

Run: python benchmarks/run.py steps --full --device cpu --out cpu.json (--quick: light).
"""

from __future__ import annotations

import math
import os
import re
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import common  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402
from cases import Case, Impl  # noqa: E402
from targets import faster, memory_at_most, ms, target  # noqa: E402

BENCH = "steps"
CASE_NAMES = {
    "sft": "SFT step, full fine-tune",
    "sft_lora": "SFT step, LoRA r=16",
    "dpo": "DPO step, full fine-tune",
    "dpo_lora": "DPO step, LoRA r=16",
}
IMPLS = ("kernelrl", "eager", "trl")

MODEL_FULL = {"H": 256, "I": 688, "L": 4, "V": 32000}
MODEL_QUICK = {"H": 128, "I": 344, "L": 2, "V": 8000}
SFT_FULL = {"B": 8, "T": 512, **MODEL_FULL}
DPO_FULL = {"P": 8, "Tp": 256, "Tr": 256, **MODEL_FULL}
SFT_QUICK = {"B": 2, "T": 128, **MODEL_QUICK}
DPO_QUICK = {"P": 1, "Tp": 64, "Tr": 64, **MODEL_QUICK}
THREADS = 2
LORA_R, LORA_ALPHA = 16, 16.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, MAX_GRAD_NORM, BETA, SEED = 1e-4, 1.0, 0.1, 0
TOTAL_STEPS = 1000               # the schedules' length: the lr stays ~1e-4 over a run
PAD, EOS, FIRST_ID = 0, 1, 3     # token ids; data ids are drawn from [FIRST_ID, V)
LOSS_ATOL, LOSS_RTOL, PARAM_TOL = 1e-4, 1e-5, 1e-3
CPU_MEMORY_FRACTION, GPU_SPEEDUP, GPU_MEMORY_FRACTION = 0.5, 1.5, 0.5


def plan(device: str, quick: bool) -> list:
    """[(case_id, shape, dtype)]: the light default (one case, a DPO LoRA step: the one that
    exercises the most of the loop; seconds) or the issue's shapes (--full), the same on a
    GPU."""
    if quick:
        return [("dpo_lora", _shape("dpo_lora", device, quick), "fp32")]
    return [(c, _shape(c, device, quick), "fp32") for c in ("sft", "dpo", "dpo_lora", "sft_lora")]


def _shape(case_id: str, device: str, quick: bool) -> dict:
    dpo = case_id.startswith("dpo")
    base = (DPO_QUICK if quick else DPO_FULL) if dpo else (SFT_QUICK if quick else SFT_FULL)
    shape = dict(base, tok=_tokens(base))
    if not common.is_cuda(device):
        shape["thr"] = min(THREADS, os.cpu_count() or 1)
    return shape


def _tokens(shape: dict) -> int:
    if "P" in shape:
        return 2 * shape["P"] * (shape["Tp"] + shape["Tr"])
    return shape["B"] * shape["T"]


def _flops(case_id: str, shape: dict) -> float:
    H, I, L, V = (shape[k] for k in ("H", "I", "L", "V"))
    T = shape["Tp"] + shape["Tr"] if "P" in shape else shape["T"]
    tokens = _tokens(shape)
    linear = 2 * (L * (4 * H * H + 3 * H * I) + H * V) * tokens
    attention = 4 * L * T * H * tokens
    forward = linear + attention
    backward = (linear if case_id.endswith("lora") else 2 * linear) + 2 * attention
    return forward + backward + (forward if case_id.startswith("dpo") else 0)


# ----------------------------------------------------------------------------------------
# The model, its trainable parameters, the data
# ----------------------------------------------------------------------------------------
def _llama(shape: dict, device: str):
    """The same LlamaForCausalLM every time: fp32, seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    T = shape["Tp"] + shape["Tr"] if "P" in shape else shape["T"]
    config = LlamaConfig(
        vocab_size=shape["V"], hidden_size=shape["H"], intermediate_size=shape["I"],
        num_hidden_layers=shape["L"], num_attention_heads=shape["H"] // 64,
        num_key_value_heads=shape["H"] // 64, max_position_embeddings=max(T, 128),
        tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS)
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.float32)


def _canonical(name: str) -> str:
    """A parameter's name, the same under kernelrl's LoRA, PEFT and none: LoRA matrices as
    '<module>.A' / '<module>.B'."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.lora_([AB])\.default\.weight$", r".\1", name)    # PEFT
    name = re.sub(r"\.lora\.([AB])\.default$", r".\1", name)           # kernelrl
    return re.sub(r"\.(base_layer|base)\.", ".", name)


def _trainable(model) -> list:
    """The trainable parameters, sorted by canonical name: the order every row returns."""
    named = sorted((_canonical(n), p) for n, p in model.named_parameters() if p.requires_grad)
    return [p for _, p in named]


def _init_adapters(model) -> None:
    """Every LoRA A ~ U(±1/√H_in) from a generator seeded by its module's name, so that
    kernelrl's LoRA and PEFT start from the same adapters (B is 0 in both)."""
    import torch

    for name, p in model.named_parameters():
        if _canonical(name).endswith(".A"):
            g = torch.Generator().manual_seed(zlib.crc32(_canonical(name).encode()))
            bound = 1 / math.sqrt(p.shape[1])
            with torch.no_grad():
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1).mul_(bound))


def _ids(shape: dict, seed: int) -> list:
    """SFT: B rows of T ids; DPO: P (prompt, chosen, rejected), each response ending in EOS."""
    import torch

    g = torch.Generator().manual_seed(7000 + seed)

    def draw(n):
        return torch.randint(FIRST_ID, shape["V"], (n,), generator=g).tolist()

    if "P" not in shape:
        return [draw(shape["T"]) for _ in range(shape["B"])]
    return [(draw(shape["Tp"]), draw(shape["Tr"] - 1) + [EOS], draw(shape["Tr"] - 1) + [EOS])
            for _ in range(shape["P"])]


def _batch(shape: dict, seed: int, device: str):
    from kernelrl.train.batching import collate_preferences, collate_sft
    from kernelrl.train.data import PreferenceSample, SFTSample

    rows = _ids(shape, seed)
    if "P" not in shape:
        return collate_sft([SFTSample(r, list(r)) for r in rows], PAD).to(device)
    samples = [PreferenceSample(p, [c, r], [(0, 1)]) for p, c, r in rows]
    return collate_preferences(samples, PAD).to(device)


def _pinned(step, device: str):
    """On a CPU the step runs with THREADS intra-op threads (the issue's setting)."""
    import torch

    if common.is_cuda(device):
        return step

    def run(x):
        before = torch.get_num_threads()
        torch.set_num_threads(min(THREADS, os.cpu_count() or 1))
        try:
            return step(x)
        finally:
            torch.set_num_threads(before)

    return run


# ----------------------------------------------------------------------------------------
# kernelrl: the trainers' calls
# ----------------------------------------------------------------------------------------
def _kernelrl(case_id: str, shape: dict, device: str):
    import torch
    from kernelrl.models.logprobs import token_logprobs
    from kernelrl.train.common import (build_optimizer, clip_gradients, make_trainable,
                                       trainable_parameters, warmup_cosine)
    from kernelrl.train.dpo import DPOConfig, dpo_step_loss, reference_logps

    lora = case_id.endswith("lora")
    model = make_trainable(_llama(shape, device), lora_r=LORA_R if lora else 0,
                           lora_alpha=LORA_ALPHA, lora_targets=",".join(LORA_TARGETS))
    if lora:
        _init_adapters(model)
    params, out = trainable_parameters(model), _trainable(model)
    optimizer = build_optimizer(model, lr=LR)
    scheduler = warmup_cosine(optimizer, warmup_steps=0, total_steps=TOTAL_STEPS)

    def finish(loss, norm):
        torch.stack([loss.detach(), norm.float()]).tolist()    # the trainers' one host sync
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return (loss.detach().reshape(1), *out)

    if case_id.startswith("sft"):
        def sft_step(x):
            batch = x["batch"]
            inputs = batch.model_inputs(mask="position_ids")
            loss = -token_logprobs(model, batch.input_ids, inputs["attention_mask"],
                                   batch.labels, position_ids=batch.position_ids,
                                   reduction="sum") / max(batch.num_label_tokens, 1)
            loss.backward()
            return finish(loss, clip_gradients(params, MAX_GRAD_NORM))

        return _pinned(sft_step, device)

    cfg = DPOConfig(model="(in memory)", data="(in memory)", out="(unused)", beta=BETA, lr=LR,
                    max_grad_norm=MAX_GRAD_NORM, lora_r=LORA_R if lora else 0)
    ref = None if lora else _llama(shape, device).eval().requires_grad_(False)

    def dpo_step(x):
        batch = x["batch"]
        ref_logps = reference_logps(model if lora else ref, batch, cfg, adapters_off=lora)
        loss, _ = dpo_step_loss(model, batch, ref_logps, cfg)
        loss.backward()
        return finish(loss, clip_gradients(params, cfg.max_grad_norm))

    return _pinned(dpo_step, device)


# ----------------------------------------------------------------------------------------
# eager: plain torch + transformers (+ PEFT)
# ----------------------------------------------------------------------------------------
def _peft(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules=list(LORA_TARGETS), bias="none",
                                            task_type="CAUSAL_LM"))


def eager_token_logps(model, input_ids, attention_mask, labels):
    """([B, T-1] log-probs of the next tokens, 0 where not scored; the scored mask), from
    the full logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    return logp.squeeze(-1) * mask, mask


def _eager(case_id: str, shape: dict, device: str):
    import torch
    import torch.nn.functional as F

    lora = case_id.endswith("lora")
    model = _llama(shape, device)
    if lora:
        model = _peft(model)
        _init_adapters(model)
    model.train()
    out = _trainable(model)
    optimizer = torch.optim.AdamW(out, lr=LR, weight_decay=0.0)

    def finish(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(out, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (loss.detach().reshape(1), *out)

    if case_id.startswith("sft"):
        def sft_step(x):
            b = x["batch"]
            logp, mask = eager_token_logps(model, b.input_ids, b.attention_mask, b.labels)
            return finish(-logp.sum() / mask.sum())

        return _pinned(sft_step, device)

    ref = None if lora else _llama(shape, device).eval().requires_grad_(False)

    def dpo_step(x):
        b = x["batch"]
        with torch.no_grad():
            if lora:
                with model.disable_adapter():
                    ref_logps = eager_token_logps(model, b.input_ids, b.attention_mask,
                                                  b.labels)[0].sum(-1)
            else:
                ref_logps = eager_token_logps(ref, b.input_ids, b.attention_mask,
                                              b.labels)[0].sum(-1)
        logps = eager_token_logps(model, b.input_ids, b.attention_mask, b.labels)[0].sum(-1)
        margin = (logps[b.better] - ref_logps[b.better]) - (logps[b.worse] - ref_logps[b.worse])
        return finish(-F.logsigmoid(BETA * margin).mean())

    return _pinned(dpo_step, device)


# ----------------------------------------------------------------------------------------
# trl: the trainer's own step
# ----------------------------------------------------------------------------------------
def _missing(*modules: str) -> str | None:
    """Why a row cannot run here (a module not installed), or None."""
    import importlib.util
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return f"not installed: {', '.join(absent)} (pip install {' '.join(absent)})"


SPECIAL = {PAD: "<pad>", EOS: "</s>", 2: "<unk>"}


def _word(i: int) -> str:
    return SPECIAL.get(i, f"t{i}")


def _word_tokenizer(vocab: int):
    """Token id i is the word 't<i>' (0, 1, 2: <pad>, </s>, <unk>; special words are
    matched anywhere in a text, so none may be the prefix of another): text of such words
    tokenizes back to exactly the ids it was written from."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({_word(i): i for i in range(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=_word(PAD),
                                   eos_token=_word(EOS), unk_token="<unk>")


def _trl(case_id: str, shape: dict, device: str):
    import dataclasses
    import tempfile

    import datasets
    from datasets import Dataset
    from trl import SFTConfig

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    datasets.disable_progress_bars()
    # transformers >= 5.24 renamed gradient_checkpointing (TRL's default: on) to this
    checkpointing = ("activation_checkpointing" if "activation_checkpointing"
                     in {f.name for f in dataclasses.fields(SFTConfig)}
                     else "gradient_checkpointing")
    lora = case_id.endswith("lora")
    sft = case_id.startswith("sft")
    tokenizer = _word_tokenizer(shape["V"])
    rows = _ids(shape, 0)
    workdir = tempfile.TemporaryDirectory(prefix="kernelrl-bench-trl-")
    common_args = dict(
        output_dir=workdir.name, per_device_train_batch_size=len(rows),
        gradient_accumulation_steps=1, learning_rate=LR, max_grad_norm=MAX_GRAD_NORM,
        max_steps=TOTAL_STEPS, weight_decay=0.0, bf16=False, fp16=False,
        **{checkpointing: False}, use_cpu=not common.is_cuda(device), report_to="none",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        seed=SEED, dataloader_num_workers=0, max_length=None)
    peft_config = None
    if lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=list(LORA_TARGETS), bias="none",
                                 task_type="CAUSAL_LM")
    model = _llama(shape, device)
    if sft:
        from trl import SFTTrainer
        data = Dataset.from_dict({"input_ids": rows, "labels": [[-100] + r[1:] for r in rows]})
        trainer = SFTTrainer(model=model, args=SFTConfig(**common_args), train_dataset=data,
                             processing_class=tokenizer, peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        def words(ids):
            return " ".join(map(_word, ids))

        data = Dataset.from_dict({"prompt": [words(p) for p, _, _ in rows],
                                  "chosen": [" " + words(c) for _, c, _ in rows],
                                  "rejected": [" " + words(r) for _, _, r in rows]})
        ref = None if lora else _llama(shape, device).eval().requires_grad_(False)
        trainer = DPOTrainer(model=model, ref_model=ref,
                             args=DPOConfig(**common_args, beta=BETA, loss_type=["sigmoid"]),
                             train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    if lora:
        _init_adapters(trainer.model)
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL_STEPS)
    model, trainer.optimizer, trainer.lr_scheduler = trainer.accelerator.prepare(
        trainer.model, trainer.optimizer, trainer.lr_scheduler)
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = 1       # what the loop sets per step
    batches, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1,
                                                   trainer.args.device)
    inputs = batches[0]
    _check_trl_batch(inputs, rows, sft)
    out = _trainable(model)

    def trl_step(x):
        loss = trainer.training_step(model, dict(inputs), num_items)
        float(trainer.accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return (loss.detach().reshape(1), *out)

    trl_step.workdir = workdir        # removed with the step function
    return _pinned(trl_step, device)


def _check_trl_batch(inputs: dict, rows: list, sft: bool) -> None:
    """TRL's batch must hold exactly our token ids (in its own order), or it is not the
    same step."""
    got = sorted(map(tuple, inputs["input_ids"].tolist()))
    want = (rows if sft else [p + c for p, c, _ in rows] + [p + r for p, _, r in rows])
    if got != sorted(map(tuple, want)):
        raise RuntimeError("TRL's collated batch does not hold the benchmark's token ids "
                           "(its tokenization or truncation changed them)")


# ----------------------------------------------------------------------------------------
# The case
# ----------------------------------------------------------------------------------------
def _check(case_id: str, shape: dict, device: str):
    """(ref, out) -> None or why not: the losses, then the parameters after the step
    (module docstring)."""
    initial = []

    def start():
        if not initial:
            model = _llama(shape, device)
            if case_id.endswith("lora"):      # as eager builds it (B = 0, A as _init_adapters)
                model = _peft(model)
                _init_adapters(model)
            initial.extend(p.detach().clone() for p in _trainable(model))
        return initial

    def check(ref, out):
        if len(out) != len(ref):
            return f"returned {len(out) - 1} parameters, eager {len(ref) - 1}"
        loss, loss_ref = out[0].item(), ref[0].item()
        if not abs(loss - loss_ref) <= LOSS_ATOL + LOSS_RTOL * abs(loss_ref):
            return f"loss {loss:.7g} vs eager {loss_ref:.7g}"
        for p, q in zip(out[1:], ref[1:]):
            if p.shape != q.shape:
                return f"parameter shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}"
        diff = math.sqrt(sum(float((p.double() - q.double()).pow(2).sum())
                             for p, q in zip(out[1:], ref[1:])))
        update = math.sqrt(sum(float((q.double() - p0.double()).pow(2).sum())
                               for q, p0 in zip(ref[1:], start())))
        if not (math.isfinite(diff) and diff <= PARAM_TOL * update):
            return (f"parameters after one step differ from eager's by {diff:.3g} (L2), "
                    f"more than {PARAM_TOL:g} x eager's update {update:.3g}")
        return None

    return check


def make_case(case_id: str, shape: dict, dtype: str, device: str) -> Case:
    if case_id not in CASE_NAMES:
        raise ValueError(f"case_id: expected one of {sorted(CASE_NAMES)}, got {case_id!r}")
    if dtype != "fp32":
        raise ValueError(f"dtype: the steps benchmark runs fp32 only, got {dtype!r}")
    shape = dict(shape)
    if case_id.startswith("dpo") != ("P" in shape):
        raise ValueError(f"shape {shape}: {case_id} expects "
                         f"{'P, Tp, Tr' if case_id.startswith('dpo') else 'B, T'}")

    def make_inputs(seed):
        return {"batch": _batch(shape, seed, device)}

    impls = {
        "kernelrl": Impl(lambda: _kernelrl(case_id, shape, device)),
        "eager": Impl(lambda: _eager(case_id, shape, device),
                      skip=_missing("peft") if case_id.endswith("lora") else None),
        "trl": Impl(lambda: _trl(case_id, shape, device),
                    skip=_missing("trl", "datasets", "peft")),
    }
    return Case(bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape=shape,
                dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
                check=_check(case_id, shape, device), flops=_flops(case_id, shape))


# ----------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------
def _target_shape(case_id: str) -> dict:
    base = DPO_FULL if case_id.startswith("dpo") else SFT_FULL
    return dict(base, tok=_tokens(base))


def _tokens_per_s(rows: list, case_id: str) -> str:
    shape = _target_shape(case_id)
    parts = []
    for impl in IMPLS:
        row = report.find_row(rows, CASE_NAMES[case_id], impl, shape, "fp32")
        if ms(row) is not None:
            parts.append(f"{impl} {shape['tok'] / (ms(row) / 1e3):,.0f}")
    return f"; tokens/s: {', '.join(parts)}" if parts else ""


def _with(t: dict, extra: str) -> dict:
    return dict(t, detail=t["detail"] + extra)


def targets(rep: dict) -> list:
    rows, out = rep["results"], []
    cuda = rep.get("device_kind") == "cuda"
    if not cuda:
        for case_id in ("sft", "sft_lora", "dpo", "dpo_lora"):
            case, shape = CASE_NAMES[case_id], _target_shape(case_id)
            at = f"CPU {case} (full shape)"
            out.append(_with(faster(rows, case, shape, "fp32", "eager",
                                    f"{at}: kernelrl tokens/s >= eager's", cpu=True,
                                    or_equal=True), _tokens_per_s(rows, case_id)))
            out.append(memory_at_most(rows, case, shape, "fp32", "eager",
                                      f"{at}: kernelrl extra memory <= 1/2 of eager's",
                                      fraction=CPU_MEMORY_FRACTION))
        out.append(target(f"GPU DPO steps: kernelrl >= {GPU_SPEEDUP:g}x TRL's tokens/s at "
                          f"<= 1/2 of TRL's peak memory", "NOT CHECKED",
                          "a CPU run: GPU targets are only judged from a GPU run"))
        return out
    for case_id in ("dpo", "dpo_lora"):
        case, shape = CASE_NAMES[case_id], _target_shape(case_id)
        at = f"GPU {case} (full shape)"
        out.append(_with(faster(rows, case, shape, "fp32", "trl",
                                f"{at}: kernelrl >= {GPU_SPEEDUP:g}x TRL's tokens/s",
                                cpu=False, or_equal=True, factor=GPU_SPEEDUP),
                         _tokens_per_s(rows, case_id)))
        out.append(memory_at_most(rows, case, shape, "fp32", "trl",
                                  f"{at}: kernelrl peak memory <= 1/2 of TRL's",
                                  fraction=GPU_MEMORY_FRACTION))
    return out


if __name__ == "__main__":
    sys.exit(suite.bench_main(sys.modules[__name__]))
