"""The MoE case of the steps family (bench_steps.py, case ``sft_moe``): one SFT step, full
fine-tuning, of a tiny Mixtral (MixtralForCausalLM): kernelrl's trainer on its MoE kernels
against the unpatched Hugging Face model (eager, and TRL's SFTTrainer).

Shape legend: bench_steps.py's SFT keys (B sequences of T tokens; H hidden, L layers, V
vocabulary, H/64 heads, as many KV heads) and E experts per layer, K experts per token
(top-K), I each expert's FFN width. Light: H=128 I=256 L=2 E=8 K=2 V=8000, B=2 T=128 (256
tokens); full (--full): H=256 I=512 L=4 E=8 K=2 V=32000, B=8 T=512 (4,096 tokens): the
dense ``sft`` case's model and batch with the MLP an MoE of 8 experts of width 512 (two
active per token: about 1.5x the work of the dense MLP of 688). Not in the light default
run: the light case costs about a minute on the 2-core VM (three rows, TRL's setup, the
check's extra forwards, a memory process per row), three times the 20 s budget of a default
case. Run it with ``python benchmarks/run.py steps --full --cases sft_moe`` (or
``python benchmarks/bench_steps.py --cases sft_moe``, whose default is the full shapes);
``--cases`` picks among the planned cases, so a light run (--quick) never has it.

The model: ``MixtralConfig`` of that shape, fp32, under torch.manual_seed(0),
router_aux_loss_coef 0.02 (Mixtral-8x7B's released config; transformers' default is 0.001),
router_jitter_noise 0 (its default: no noise, so the routing is a function of the weights),
transformers' default attention (sdpa) and experts implementation (5.x: ``grouped_mm``
where torch has it, else its per-expert loop), no dropout. Every row starts from it and
takes the same batch (bench_steps.py's SFT batch: every token but each row's first scored),
AdamW lr 1e-4, the gradient norm clipped to 1.0, as every steps row. What one call is:

  kernelrl  the SFT trainer's step (kernelrl/train/sft.py) on the model set up by
            ``make_trainable`` (``moe_kernels`` on, its default: ``patch_moe`` replaces each
            MixtralSparseMoeBlock by ``kernelrl.nn.SparseMoE``, same parameters):
            -token_logprobs(reduction="sum") / N plus the router's aux loss as the trainer
            adds it, ``common.RouterAux(model, cfg).add(loss, weight=1, mask=attention
            mask)`` with the SFTConfig's router_aux_coef unset, so c = the config's
            router_aux_loss_coef (the trainer's default); backward, clip_gradients, the
            host sync (loss, aux, norm), AdamW step, scheduler step, zero_grad.
  eager     the unpatched model called as transformers' Mixtral user trains it:
            ``model(input_ids, attention_mask, output_router_logits=True)``, full logits,
            log_softmax, gather, the masked mean NLL, plus router_aux_loss_coef ·
            ``outputs.aux_loss`` (``load_balancing_loss_func(router_logits, E, K,
            attention_mask)``: what MixtralForCausalLM adds to its loss when given labels),
            backward, clip_grad_norm_, torch AdamW step, zero_grad.
  trl       bench_steps.py's TRL row (SFTTrainer) on the unpatched model: TRL reads
            router_aux_loss_coef from the config, turns output_router_logits on and adds
            coef · outputs.aux_loss to its (fused LM head) loss.

Like with like: kernelrl's ``router_aux_loss`` is transformers' pooled loss (the docstring
of kernelrl/models/moe.py): E·Σ_e f̄_e·P̄_e with f̄ the top-K assignment counts and P̄ the
router probabilities pooled over the L layers and the unmasked tokens (K at perfect
balance), not a mean of per-layer losses; with the same coefficient every row's loss is
the same total, NLL + c·aux, and its gradient reaches the routers through both terms.

Check before timing (bench_steps.py's: every row's loss within 1e-4 + 1e-5·|loss| of
eager's, and all its parameters after the step, experts and routers included, within 0.1%
of eager's update), preceded by one on the routing. Top-K routing is discrete and the two
sides compute the router logits only equal up to rounding (other expert kernels feed the
next layer's router), so a token whose K-th and (K+1)-th logits are nearly tied could take
another expert on one side, and the step would then differ for a reason that is no bug.
The check therefore runs the initial model on the check's batch, unpatched (eager's code)
and then patched (kernelrl's), both with the rows' thread count, and fails unless (1) both
pick the same K experts for every token in every layer ("routing differs") and (2) every
token's gap between its K-th and (K+1)-th router logit, in every layer, is at least
max(ROUTING_GAP = 1e-6, 10x the largest difference between the two sides' logits) ("near-
tie in routing"): every choice then has a margin of at least 5x what rounding moved the
logits between the sides, and the rows' own forwards are that same code on the same
weights and batch. Measured at seed 0: the sides'
router logits are bit-equal at the light and full shapes (up to 6e-8 apart at the tests'
tiny shape); the smallest gaps are 4.1e-4 (light) and 8.8e-6 (full, in layer 0, whose
router input is the same on both sides anyway), so the check passes at every planned shape
without a hand-picked seed. The TRL row runs transformers' own blocks, as eager.

flops: bench_steps.py's count with the MLP's routed work: K experts' 3·H·I per token plus
the router's H·E (the experts that a token skips are not counted).
"""

from __future__ import annotations

import steps_common as sc
from cases import Case, Impl

FULL = {"B": 8, "T": 512, "H": 256, "I": 512, "L": 4, "E": 8, "K": 2, "V": 32000}
QUICK = {"B": 2, "T": 128, "H": 128, "I": 256, "L": 2, "E": 8, "K": 2, "V": 8000}
AUX_COEF = 0.02                 # Mixtral-8x7B's router_aux_loss_coef
ROUTING_GAP = 1e-6              # the least K-th to (K+1)-th router logit gap the check takes


def mixtral(shape: dict, device: str):
    """The same MixtralForCausalLM every time: fp32, seeded (module docstring)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=shape["V"], hidden_size=shape["H"], intermediate_size=shape["I"],
        num_hidden_layers=shape["L"], num_attention_heads=shape["H"] // 64,
        num_key_value_heads=shape["H"] // 64, num_local_experts=shape["E"],
        num_experts_per_tok=shape["K"], router_aux_loss_coef=AUX_COEF,
        router_jitter_noise=0.0, max_position_embeddings=max(shape["T"], 128),
        tie_word_embeddings=False, pad_token_id=sc.PAD, bos_token_id=2, eos_token_id=sc.EOS)
    torch.manual_seed(sc.SEED)
    return MixtralForCausalLM(config).to(device=device, dtype=torch.float32)


def _kernelrl(shape: dict, device: str):
    from kernelrl.train.common import RouterAux, make_trainable
    from kernelrl.train.sft import SFTConfig

    model = make_trainable(mixtral(shape, device))           # moe_kernels: patch_moe
    cfg = SFTConfig(model="(in memory)", data="(in memory)", out="(unused)", lr=sc.LR,
                    max_grad_norm=sc.MAX_GRAD_NORM)           # router_aux_coef: the config's
    aux = RouterAux(model, cfg)
    if aux.coef != AUX_COEF:
        raise RuntimeError(f"the trainer's router aux coefficient is {aux.coef}, the "
                           f"config's {AUX_COEF}")
    finish = sc.kernelrl_finish(model)

    def step(x):
        batch = x["batch"]
        # one micro-batch: weight 1 (its share of the step's tokens), mask: its real tokens
        loss, stats = aux.add(sc.kernelrl_sft_loss(model, batch), {}, weight=1.0,
                              mask=batch.attention_mask)
        return finish(loss, *stats.values())

    return sc.pinned(step, device)


def _eager(shape: dict, device: str):
    model = mixtral(shape, device)
    model.train()
    finish = sc.eager_finish(model)
    coef = model.config.router_aux_loss_coef

    def step(x):
        b = x["batch"]
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False,
                    output_router_logits=True)
        return finish(sc.eager_sft_loss(out.logits, b.labels) + coef * out.aux_loss)

    return sc.pinned(step, device)


def routing(model, batch, top_k: int, device: str) -> dict:
    """The check's look at the routing of ``batch``'s first forward, ``model`` being the
    initial (unpatched) model, patched in place here: ``gap``, the smallest difference
    between a real token's K-th and (K+1)-th largest router logit over the layers of the
    unpatched forward (eager's); ``diff``, the largest difference between those logits and
    the patched forward's (kernelrl's); ``same``, whether both pick the same K experts for
    every real token in every layer. Both forwards with the rows' thread count."""
    import torch
    from kernelrl.models import moe_modules, patch_moe

    real = batch.attention_mask.reshape(-1).bool()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  use_cache=False)

    def forwards(_):
        with torch.no_grad():
            hf = [t[real].float() for t in model(**inputs, output_router_logits=True)
                  .router_logits]                                   # [N, E] per layer
            patch_moe(model)
            model(**inputs)
        ours = [m for _, m in moe_modules(model)]
        return hf, [m.last_router_logits[real].float() for m in ours], [
            m.last_experts[real].sort(-1).values for m in ours]

    hf, logits, experts = sc.pinned(forwards, device)(None)
    top = [t.topk(top_k + 1, dim=-1) for t in hf]
    return {"gap": min(float((t.values[:, top_k - 1] - t.values[:, top_k]).min())
                       for t in top),
            "diff": max(float((a - b).abs().max()) for a, b in zip(hf, logits)),
            "same": len(experts) == len(top) and all(
                torch.equal(t.indices[:, :top_k].sort(-1).values, e)
                for t, e in zip(top, experts))}


def _check(shape: dict, device: str, make_inputs):
    """(ref, out) -> None or why not: the routing of the check's batch (module docstring),
    then bench_steps' comparison with eager's step."""
    p0, seen = [], {}

    def check(expected, out):
        if not seen:
            model = mixtral(shape, device)
            p0.extend(p.detach().clone() for p in sc.trainable(model))
            seen.update(routing(model, make_inputs(0)["batch"], shape["K"], device))
        if not seen["same"]:
            return ("routing differs: kernelrl's SparseMoE and transformers' block pick "
                    "other experts for some token of the check's batch (initial weights)")
        least = max(ROUTING_GAP, 10 * seen["diff"])
        if not seen["gap"] >= least:
            return (f"near-tie in routing: a token's K-th and (K+1)-th router logits differ "
                    f"by {seen['gap']:.3g} < {least:.3g} in the initial forward (the sides' "
                    f"logits differ by up to {seen['diff']:.3g}), so rounding may route it "
                    f"differently on each side; pick another seed or shape")
        return sc.compare_step(out, expected, lambda: p0)

    return check


def make_case(bench: str, case_id: str, name: str, shape: dict, dtype: str, device: str,
              make_inputs, *, flops: float, trl: Impl) -> Case:
    missing = [k for k in ("E", "K") if k not in shape]
    if missing or not 1 <= shape["K"] < shape["E"]:
        raise ValueError(f"shape {shape}: {case_id} expects E experts and K top-k, "
                         f"1 <= K < E")
    impls = {"kernelrl": Impl(lambda: _kernelrl(shape, device)),
             "eager": Impl(lambda: _eager(shape, device)),
             "trl": trl}
    return Case(bench=bench, case_id=case_id, case=name, shape=shape, dtype=dtype,
                make_inputs=make_inputs, impls=impls, device=device,
                check=_check(shape, device, make_inputs), ref="eager", flops=flops)
