"""Benchmark: one training step (SFT, DPO, PPO; LoRA, QLoRA) of a small Llama, and one SFT
step of a small Mixtral (MoE): kernelrl vs eager vs TRL (QLoRA: vs bitsandbytes + PEFT).

Shape legend: B sequences, T tokens per sequence (SFT); P pairs, Tp prompt and Tr response
tokens per sequence (DPO: 2·P sequences of Tp + Tr); B prompts of Tp tokens, one response
of Tr tokens each (PPO); H hidden, I MLP width, L layers (H/64 heads, as many KV heads), V
vocabulary; tok = tokens in the step's batch (PPO: B·(Tp + Tr), the iteration's sequences);
thr = torch intra-op threads during the step (CPU: 2, or the cores there are if fewer).

Target shapes (--full): H=256 I=688 L=4 V=32000, fp32; SFT B=8 T=512 (4,096 tokens, every
token but the first of each row scored); DPO P=8 Tp=256 Tr=256 (16 sequences, 8,192 tokens,
the response tokens scored); PPO B=8 Tp=64 Tr=64 (1,024 tokens), one PPO epoch of one
mini-batch. Default (light) shapes: H=128 I=344 L=2 V=8000, SFT B=2 T=128, DPO P=1 Tp=64
Tr=64, PPO B=4 Tp=32 Tr=32; the default run has the cases "dpo_lora", "ppo_lora" and
"sft_qlora" (the tests also run "sft" and, at tiny shapes, "dpo_qlora" and "sft_moe"). QLoRA
("sft_qlora", "dpo_qlora"): the SFT and DPO shapes with I rounded up to a multiple of 64
(full 704, light 384). MoE ("sft_moe"): the SFT shapes with E=8 experts of width I, top-K=2
(full H=256 I=512 L=4 V=32000, light H=128 I=256 L=2 V=8000); not in the light default
(about a minute there). No padding in any.

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

QLoRA (cases "sft_qlora", "dpo_qlora", built in steps_qlora.py, whose docstring has the
details): the SFT and DPO LoRA steps above with the seven LoRA targets in NF4 (blocks of
64, double quantization, fp32 compute), every row on the same 4-bit weights (kernelrl's,
handed to bitsandbytes in its state dict format):
  kernelrl  the trainers' step above, the model by make_trainable(..., qlora=True).
  bnb_peft  (the check's reference) the eager step above on transformers' 4-bit load
            (BitsAndBytesConfig nf4, double quant: Linear4bit layers),
            prepare_model_for_kbit_training (no gradient checkpointing), PEFT's LoRA.
  trl       the TRL row above on that 4-bit model; TRL casts a quantized model's adapters
            to bf16, the row casts them back to fp32.
No targets (the issue states none): a line each prints their tokens/s. The light default
has sft_qlora only (about 20 s on the 2-core VM when quiet, as much as the light dpo_lora
case; both QLoRA cases would be twice that); --cases picks among the planned cases only, so
`--quick --cases dpo_qlora` runs nothing: --full (or --cases dpo_qlora) runs it.

MoE (case "sft_moe", built in steps_moe.py, whose docstring has the details): the full SFT
step of a MixtralForCausalLM (same seed and settings; router_aux_loss_coef 0.02, Mixtral-
8x7B's; no router jitter), every row's loss the token NLL + 0.02 x transformers' pooled
load-balancing loss (kernelrl's router_aux_loss computes that very quantity):
  kernelrl  the SFT step above on the model patched by make_trainable (patch_moe: every
            MixtralSparseMoeBlock a kernelrl.nn.SparseMoE), plus the aux term as the
            trainer adds it (common.RouterAux at the config's coefficient, the default).
  eager     the unpatched model called with output_router_logits=True: full logits,
            log_softmax, masked mean, + router_aux_loss_coef x outputs.aux_loss (HF's
            load_balancing_loss_func), then the eager step above.
  trl       the TRL row above on the unpatched model (SFTTrainer adds the aux term itself).
Its check first looks at the routing of the check's batch: both sides must pick the same
experts for every token, and no token's K-th and (K+1)-th router logits may be within
1e-6 (or 10x the sides' logit difference) of each other, a near-tie that rounding could
flip (seed 0's smallest gaps: light 4e-4, full 9e-6). No target: a line prints its tokens/s.
Run: python benchmarks/run.py steps --full --cases sft_moe (about 5 minutes on 2 cores).

PPO (case "ppo_lora", built in steps_ppo.py, whose docstring has the details): one
iteration, rollout and update, of kernelrl ppo's four roles on one base (adapters policy,
reward and value, the reference = adapters off), sampling at temperature 1 with no EOS (so
every response is Tr tokens), the PPOConfig defaults but lr 1e-4 and one optimizer update.
  kernelrl  kernelrl.train.ppo.train's iteration by its own functions: rl.collect_experience
            (rollout.generate's KV-cache sampler; old, reference log-probs; reward scores),
            the old values, ppo.step_targets (kernelrl.ops.kl_penalized_advantages),
            rl.rollout_metrics, rl_update.run_updates with ppo.ppo_micro_loss
            (kernelrl.ops.ppo_loss), clip, host sync, AdamW and scheduler steps.
  eager     PEFT with the same three adapters, HF model.generate, full logits +
            log_softmax + gather, reward and values from the last hidden states, GAE as the
            reversed Python loop over time steps, whitening, the clipped PPO and value
            losses in plain torch, backward, clip_grad_norm_, torch AdamW step.
  trl       none: trl 1.16 has no PPOTrainer (removed after 0.2x).

The batch is built before timing for every row (kernelrl.train.batching.collate_sft /
collate_preferences; TRL: its own collator). Tokens/s = tok / median step time; the target
lines print it for every row. flops (for TFLOP/s and % of the fp32 matmul ceiling): linear
layers and lm_head over every position, attention as T² per layer (no causal halving);
backward twice the forward for full fine-tuning, once for LoRA (no gradients for frozen
weights; LoRA's own flops not counted); DPO adds the reference forward; MoE: the MLP term
is the K routed experts' and the router's work per token. The same count for
every row of a case, so the rate ranks like time.

Check before timing: every row takes one step from the same start on the same batch;
its loss must equal eager's (|diff| <= 1e-4 + 1e-5·|loss|) and its trainable parameters
afterwards must agree with eager's to 0.1% of eager's update: ||p - p_eager|| <= 1e-3 ·
||p_eager - p_0|| over all trainable parameters (QLoRA: bnb_peft in eager's place, the
adapters the parameters; MoE: after the routing check). PPO: the rows sample with the same seed
and settings but by different code, so the check is on the update given the same rollout:
each row returns its rollout too, and eager's update is replayed on that very rollout in a
freshly built eager model, from the same start; the same two conditions then hold against
that replay.

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
       memory; kernelrl PPO (LoRA) at least 2x eager's tokens/s at most 1/2 of eager's
       peak memory (the same shapes; NOT CHECKED on a CPU run, where the PPO line prints
       the tokens/s of each row at the full shape).

Run: python benchmarks/run.py steps --full --device cpu --out cpu.json (--quick: light).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import report  # noqa: E402
import steps_common  # noqa: E402
import steps_moe  # noqa: E402
import steps_ppo  # noqa: E402
import steps_qlora  # noqa: E402
import suite  # noqa: E402
from cases import Case, Impl  # noqa: E402
from steps_common import (EOS, LORA_ALPHA, LORA_R, LORA_TARGETS, LR,  # noqa: E402
                          MAX_GRAD_NORM, MODEL_FULL, MODEL_QUICK, PAD, SEED, TOTAL_STEPS,
                          compare_step, draw_ids, eager_finish, eager_sft_loss,
                          eager_token_logps, init_adapters, initial_parameters,
                          kernelrl_finish, kernelrl_sft_loss, llama, missing, peft_lora,
                          pinned, threads, trainable, word, word_tokenizer)
from targets import faster, memory_at_most, ms, target  # noqa: E402

BENCH = "steps"
CASE_NAMES = {
    "sft": "SFT step, full fine-tune",
    "sft_lora": "SFT step, LoRA r=16",
    "dpo": "DPO step, full fine-tune",
    "dpo_lora": "DPO step, LoRA r=16",
    "ppo_lora": "PPO iteration, LoRA r=16",
    "sft_qlora": "SFT step, QLoRA r=16",
    "dpo_qlora": "DPO step, QLoRA r=16",
    "sft_moe": "SFT step, MoE full fine-tune",
}
IMPLS = ("kernelrl", "eager", "trl", steps_qlora.REF)
KEYS = {"sft": ("B", "T"), "dpo": ("P", "Tp", "Tr"), "ppo": ("B", "Tp", "Tr")}

SFT_FULL = {"B": 8, "T": 512, **MODEL_FULL}
DPO_FULL = {"P": 8, "Tp": 256, "Tr": 256, **MODEL_FULL}
SFT_QUICK = {"B": 2, "T": 128, **MODEL_QUICK}
DPO_QUICK = {"P": 1, "Tp": 64, "Tr": 64, **MODEL_QUICK}
BETA = 0.1
CPU_MEMORY_FRACTION, GPU_SPEEDUP, GPU_MEMORY_FRACTION = 0.5, 1.5, 0.5
GPU_PPO_SPEEDUP = 2.0


def plan(device: str, quick: bool) -> list:
    """[(case_id, shape, dtype)]: the light default (a DPO LoRA step, the one that exercises
    the most of the loop, a PPO LoRA iteration and an SFT QLoRA step; seconds each) or the
    issue's shapes (--full), the same on a GPU."""
    ids = ("dpo_lora", "ppo_lora", "sft_qlora") if quick else (
        "sft", "dpo", "dpo_lora", "sft_lora", "ppo_lora", "sft_qlora", "dpo_qlora", "sft_moe")
    return [(c, _shape(c, device, quick), "fp32") for c in ids]


def _base(case_id: str, quick: bool) -> dict:
    kind = case_id.split("_")[0]
    if kind == "ppo" or case_id == "sft_moe":
        module = steps_ppo if kind == "ppo" else steps_moe
        return module.QUICK if quick else module.FULL
    base = (DPO_QUICK if quick else DPO_FULL) if kind == "dpo" else (SFT_QUICK if quick else
                                                                     SFT_FULL)
    return steps_qlora.fit(base) if _qlora(case_id) else base


def _qlora(case_id: str) -> bool:
    return case_id.endswith("qlora")


def _shape(case_id: str, device: str, quick: bool) -> dict:
    base = _base(case_id, quick)
    shape = dict(base, tok=_tokens(case_id, base))
    if not common.is_cuda(device):
        shape["thr"] = threads()
    return shape


def _tokens(case_id: str, shape: dict) -> int:
    if case_id.startswith("ppo"):
        return steps_ppo.tokens(shape)
    if case_id.startswith("dpo"):
        return 2 * shape["P"] * (shape["Tp"] + shape["Tr"])
    return shape["B"] * shape["T"]


def _flops(case_id: str, shape: dict) -> float:
    if case_id.startswith("ppo"):
        return steps_ppo.flops(shape)
    H, I, L, V = (shape[k] for k in ("H", "I", "L", "V"))
    T = shape["Tp"] + shape["Tr"] if "P" in shape else shape["T"]
    tokens = _tokens(case_id, shape)
    mlp = 3 * H * I * shape.get("K", 1) + H * shape.get("E", 0)   # MoE: K experts + router
    linear = 2 * (L * (4 * H * H + mlp) + H * V) * tokens
    attention = 4 * L * T * H * tokens
    forward = linear + attention
    backward = (linear if case_id.endswith("lora") else 2 * linear) + 2 * attention
    return forward + backward + (forward if case_id.startswith("dpo") else 0)


# ----------------------------------------------------------------------------------------
# The data (the model and its adapters: steps_common)
# ----------------------------------------------------------------------------------------
def _ids(shape: dict, seed: int) -> list:
    """SFT: B rows of T ids; DPO: P (prompt, chosen, rejected), each response ending in EOS."""
    import torch

    g = torch.Generator().manual_seed(7000 + seed)

    def draw(n):
        return draw_ids(g, n, shape["V"])

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


# ----------------------------------------------------------------------------------------
# kernelrl: the trainers' calls
# ----------------------------------------------------------------------------------------
def _kernelrl(case_id: str, shape: dict, device: str):
    from kernelrl.train.common import make_trainable
    from kernelrl.train.dpo import DPOConfig, dpo_step_loss, reference_logps

    lora = case_id.endswith("lora")
    model = make_trainable(llama(shape, device), lora_r=LORA_R if lora else 0,
                           lora_alpha=LORA_ALPHA, lora_targets=",".join(LORA_TARGETS),
                           qlora=_qlora(case_id))
    if lora:
        init_adapters(model)
    finish = kernelrl_finish(model)    # backward, clip, host sync, AdamW, scheduler

    if case_id.startswith("sft"):
        return pinned(lambda x: finish(kernelrl_sft_loss(model, x["batch"])), device)

    cfg = DPOConfig(model="(in memory)", data="(in memory)", out="(unused)", beta=BETA, lr=LR,
                    max_grad_norm=MAX_GRAD_NORM, lora_r=LORA_R if lora else 0)
    ref = None if lora else llama(shape, device).eval().requires_grad_(False)

    def dpo_step(x):
        batch = x["batch"]
        ref_logps = reference_logps(model if lora else ref, batch, cfg, adapters_off=lora)
        return finish(dpo_step_loss(model, batch, ref_logps, cfg)[0])

    return pinned(dpo_step, device)


# ----------------------------------------------------------------------------------------
# eager: plain torch + transformers (+ PEFT)
# ----------------------------------------------------------------------------------------
def _eager(case_id: str, shape: dict, device: str):
    import torch
    import torch.nn.functional as F

    lora = case_id.endswith("lora")
    if _qlora(case_id):                   # the bnb_peft row: the same step, a 4-bit base
        model = steps_qlora.bnb_peft(shape, device)
    else:
        model = llama(shape, device)
        if lora:
            model = peft_lora(model)
            init_adapters(model)
    model.train()
    finish = eager_finish(model)      # backward, clip_grad_norm_, AdamW, zero_grad

    if case_id.startswith("sft"):
        def sft_step(x):
            b = x["batch"]
            return finish(eager_sft_loss(model(input_ids=b.input_ids, use_cache=False,
                                               attention_mask=b.attention_mask).logits,
                                         b.labels))

        return pinned(sft_step, device)

    ref = None if lora else llama(shape, device).eval().requires_grad_(False)

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

    return pinned(dpo_step, device)


# ----------------------------------------------------------------------------------------
# trl: the trainer's own step
# ----------------------------------------------------------------------------------------
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
    tokenizer = word_tokenizer(shape["V"])
    rows = _ids(shape, 0)
    workdir = tempfile.TemporaryDirectory(prefix="kernelrl-bench-trl-")
    common_args = dict(
        output_dir=workdir.name, per_device_train_batch_size=len(rows),
        gradient_accumulation_steps=1, learning_rate=LR, max_grad_norm=MAX_GRAD_NORM,
        max_steps=TOTAL_STEPS, weight_decay=0.0, bf16=False, fp16=False,
        **{checkpointing: False}, use_cpu=not common.is_cuda(device), report_to="none",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        seed=SEED, dataloader_num_workers=0, max_length=None)
    peft_config = steps_common.peft_config() if lora else None
    model = (steps_qlora.bnb_model if _qlora(case_id) else steps_moe.mixtral
             if case_id == "sft_moe" else llama)(shape, device)
    if sft:
        from trl import SFTTrainer
        data = Dataset.from_dict({"input_ids": rows, "labels": [[-100] + r[1:] for r in rows]})
        trainer = SFTTrainer(model=model, args=SFTConfig(**common_args), train_dataset=data,
                             processing_class=tokenizer, peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        def words(ids):
            return " ".join(map(word, ids))

        data = Dataset.from_dict({"prompt": [words(p) for p, _, _ in rows],
                                  "chosen": [" " + words(c) for _, c, _ in rows],
                                  "rejected": [" " + words(r) for _, _, r in rows]})
        ref = None if lora else llama(shape, device).eval().requires_grad_(False)
        trainer = DPOTrainer(model=model, ref_model=ref,
                             args=DPOConfig(**common_args, beta=BETA, loss_type=["sigmoid"]),
                             train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    if _qlora(case_id):
        steps_qlora.adapters_fp32(trainer.model)       # TRL made them bf16 (steps_qlora.py)
    if lora:
        init_adapters(trainer.model)
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL_STEPS)
    model, trainer.optimizer, trainer.lr_scheduler = trainer.accelerator.prepare(
        trainer.model, trainer.optimizer, trainer.lr_scheduler)
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = 1       # what the loop sets per step
    batches, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1,
                                                   trainer.args.device)
    inputs = batches[0]
    _check_trl_batch(inputs, rows, sft)
    out = trainable(model)

    def trl_step(x):
        loss = trainer.training_step(model, dict(inputs), num_items)
        float(trainer.accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return (loss.detach().reshape(1), *out)

    trl_step.workdir = workdir        # removed with the step function
    return pinned(trl_step, device)


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
def _check(case_id: str, shape: dict, device: str, ref: str = "eager"):
    """(ref, out) -> None or why not: the losses, then the parameters after the step
    (module docstring)."""
    def build():
        model = llama(shape, device)
        if case_id.endswith("lora"):          # as eager builds it (B = 0, A as init_adapters)
            model = peft_lora(model)
            init_adapters(model)
        return model

    start = initial_parameters(build)
    return lambda expected, out: compare_step(out, expected, start, who=ref)


def make_case(case_id: str, shape: dict, dtype: str, device: str) -> Case:
    if case_id not in CASE_NAMES:
        raise ValueError(f"case_id: expected one of {sorted(CASE_NAMES)}, got {case_id!r}")
    if dtype != "fp32":
        raise ValueError(f"dtype: the steps benchmark runs fp32 only, got {dtype!r}")
    shape = dict(shape)
    keys = KEYS[case_id.split("_")[0]]
    if any(k not in shape for k in keys) or ("P" in shape) != ("P" in keys):
        raise ValueError(f"shape {shape}: {case_id} expects {', '.join(keys)}")
    if case_id.startswith("ppo"):
        return steps_ppo.make_case(BENCH, case_id, CASE_NAMES[case_id], shape, dtype, device)

    def make_inputs(seed):
        return {"batch": _batch(shape, seed, device)}

    if case_id == "sft_moe":
        return steps_moe.make_case(
            BENCH, case_id, CASE_NAMES[case_id], shape, dtype, device, make_inputs,
            flops=_flops(case_id, shape), trl=Impl(lambda: _trl(case_id, shape, device),
                                                   skip=missing("trl", "datasets")))
    qlora = _qlora(case_id)
    ref = steps_qlora.REF if qlora else "eager"       # QLoRA: eager's step on bnb + PEFT
    impls = {
        "kernelrl": Impl(lambda: _kernelrl(case_id, shape, device)),
        ref: Impl(lambda: _eager(case_id, shape, device),
                  skip=(steps_qlora.skip() if qlora else
                        missing("peft") if case_id.endswith("lora") else None)),
        "trl": Impl(lambda: _trl(case_id, shape, device),
                    skip=missing("trl", "datasets", "peft", *(("bitsandbytes",) if qlora
                                                              else ()))),
    }
    return Case(bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape=shape,
                dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
                check=_check(case_id, shape, device, ref), ref=ref,
                flops=_flops(case_id, shape))


# ----------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------
def _target_shape(case_id: str) -> dict:
    base = _base(case_id, quick=False)
    return dict(base, tok=_tokens(case_id, base))


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
        out.append(target(f"GPU PPO iteration: kernelrl >= {GPU_PPO_SPEEDUP:g}x eager's "
                          f"tokens/s at <= 1/2 of eager's peak memory", "NOT CHECKED",
                          "a CPU run: GPU targets are only judged from a GPU run"
                          + _tokens_per_s(rows, "ppo_lora")))
        return out + _reported(rows, "CPU")
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
    case, shape = CASE_NAMES["ppo_lora"], _target_shape("ppo_lora")
    at = f"GPU {case} (full shape)"
    out.append(_with(faster(rows, case, shape, "fp32", "eager",
                            f"{at}: kernelrl >= {GPU_PPO_SPEEDUP:g}x eager's tokens/s",
                            cpu=False, or_equal=True, factor=GPU_PPO_SPEEDUP),
                     _tokens_per_s(rows, "ppo_lora")))
    out.append(memory_at_most(rows, case, shape, "fp32", "eager",
                              f"{at}: kernelrl peak memory <= 1/2 of eager's",
                              fraction=GPU_MEMORY_FRACTION))
    return out + _reported(rows, "GPU")


def _reported(rows: list, where: str) -> list:
    """No target for the QLoRA and MoE rows (the issue states none): a line each that prints
    their tokens/s at the full shape, as the table does not."""
    out = []
    for case_id in ("sft_qlora", "dpo_qlora", "sft_moe"):
        tokens = _tokens_per_s(rows, case_id).removeprefix("; ")
        out.append(target(f"{where} {CASE_NAMES[case_id]} (full shape): no target, reported",
                          "NOT CHECKED", "the issue states no target for these rows; "
                          + (tokens or "no rows at the full shape in this run (--full)")))
    return out


if __name__ == "__main__":
    sys.exit(suite.bench_main(sys.modules[__name__]))
