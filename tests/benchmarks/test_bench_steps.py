"""Tests of benchmarks/bench_steps.py (the "steps" family: one SFT / DPO training step of
kernelrl, eager torch and TRL, and one PPO iteration of kernelrl and eager, steps_ppo.py):
it is listed, its shapes, the light cases' kernelrl and eager steps agree (and the check
catches steps that do not), the PPO check replays eager's update on the row's own rollout
and catches an update that differs, the QLoRA cases (steps_qlora.py: kernelrl's NF4 step
against bitsandbytes + PEFT on the same 4-bit weights) agree and their check catches a
perturbed side, the MoE case (steps_moe.py: kernelrl's SFT step on a patched Mixtral with
the router aux loss against the unpatched model) agrees, routes alike on both sides with no
near-tie, and its check catches a perturbed side, TRL's step agrees where TRL is installed,
and its targets on synthetic reports."""

import importlib.util

import pytest
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

import common
import report
import suite

ENV = {"device": "cpu: test", "device_kind": "cpu", "date": "2026-01-01", "torch": "x",
       "triton": "y", "kernelrl": "abc123"}
CEILINGS = {"copy_gbps": 10.0, "bf16_tflops": None, "fp32_tflops": 0.1, "kind": "cpu",
            "note": "test"}


@pytest.fixture(scope="module")
def fam():
    return suite.load(BENCH_DIR / "bench_steps.py")


def _light(fam, case_id):
    """The case's light shape (the default run's size; the default plan runs dpo_lora,
    ppo_lora and sft_qlora)."""
    return fam._shape(case_id, "cpu", True)


# A PPO iteration small enough for a test (seconds): 1 layer, 1 head, 2 prompts of 8 + 8.
PPO_TINY = {"B": 2, "Tp": 8, "Tr": 8, "H": 64, "I": 172, "L": 1, "V": 512}


def test_listed_with_cases_and_impls(run_script):
    proc = run_script("run.py", "--list", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    block = proc.stdout[proc.stdout.index("steps  (bench_steps.py)"):]
    for line in ("case sft: SFT step, full fine-tune", "case sft_lora: SFT step, LoRA r=16",
                 "case dpo: DPO step, full fine-tune", "case dpo_lora: DPO step, LoRA r=16",
                 "case ppo_lora: PPO iteration, LoRA r=16",
                 "case sft_qlora: SFT step, QLoRA r=16",
                 "case dpo_qlora: DPO step, QLoRA r=16",
                 "case sft_moe: SFT step, MoE full fine-tune",
                 "impls: kernelrl, eager, trl, bnb_peft"):
        assert line in block, block


def test_plan_shapes(fam):
    assert [c for c, _, _ in fam.plan("cpu", True)] == ["dpo_lora", "ppo_lora",   # default
                                                        "sft_qlora"]
    light = [(c, fam._shape(c, "cpu", True)) for c in ("sft", "dpo_lora", "ppo_lora")]
    assert all(shape["V"] == 8000 and shape["L"] == 2 for _, shape in light)
    assert light[0][1]["B"] == 2 and light[0][1]["T"] == 128 and light[0][1]["tok"] == 256
    assert light[1][1]["tok"] == 256                       # 1 pair: 2 sequences of 64 + 64
    assert {k: light[2][1][k] for k in ("B", "Tp", "Tr", "tok")} == {"B": 4, "Tp": 32,
                                                                     "Tr": 32, "tok": 256}
    full = {c: shape for c, shape, _ in fam.plan("cpu", False)}
    assert set(full) == {"sft", "sft_lora", "dpo", "dpo_lora", "ppo_lora", "sft_qlora",
                         "dpo_qlora", "sft_moe"}
    for c, shape in full.items():
        # QLoRA: I a multiple of NF4's block of 64 (bitsandbytes' CPU dequantize needs it);
        # MoE: 8 experts of I = 512, 2 per token
        assert {k: shape[k] for k in ("H", "I", "L", "V")} == {
            "H": 256, "I": 704 if c.endswith("qlora") else 512 if c == "sft_moe" else 688,
            "L": 4, "V": 32000}
        assert shape["thr"] >= 1
        assert shape["tok"] == {"dpo": 8192, "ppo": 1024}.get(c[:3], 4096)
    assert full["sft"]["B"] == 8 and full["sft"]["T"] == 512
    assert (full["dpo"]["P"], full["dpo"]["Tp"], full["dpo"]["Tr"]) == (8, 256, 256)
    assert (full["ppo_lora"]["B"], full["ppo_lora"]["Tp"], full["ppo_lora"]["Tr"]) == (8, 64, 64)
    assert {k: full["sft_qlora"][k] for k in ("B", "T")} == {"B": 8, "T": 512}
    assert {k: full["sft_moe"][k] for k in ("B", "T", "E", "K")} == {"B": 8, "T": 512, "E": 8,
                                                                    "K": 2}
    light_moe = fam._shape("sft_moe", "cpu", True)            # not in the default plan
    assert {k: light_moe[k] for k in ("H", "I", "L", "E", "K", "V", "tok")} == {
        "H": 128, "I": 256, "L": 2, "E": 8, "K": 2, "V": 8000, "tok": 256}
    # two experts of 512 per token and a router: more than the dense MLP of 688
    assert fam._flops("sft_moe", full["sft_moe"]) > fam._flops("sft", full["sft"])
    moe = fam.make_case("sft_moe", full["sft_moe"], "fp32", "cpu")
    assert set(moe.impls) == {"kernelrl", "eager", "trl"} and moe.ref == "eager"
    with pytest.raises(ValueError, match="E experts"):
        fam.make_case("sft_moe", full["sft"], "fp32", "cpu")
    assert {k: full["dpo_qlora"][k] for k in ("P", "Tp", "Tr")} == {"P": 8, "Tp": 256,
                                                                    "Tr": 256}
    light_qlora = {c: shape for c, shape, _ in fam.plan("cpu", True)}["sft_qlora"]
    assert light_qlora["I"] == 384 and light_qlora["tok"] == 256            # light: 344 -> 384
    assert fam._flops("sft_qlora", full["sft_qlora"]) < fam._flops("sft", full["sft_qlora"])
    qlora = fam.make_case("sft_qlora", full["sft_qlora"], "fp32", "cpu")
    assert set(qlora.impls) == {"kernelrl", "bnb_peft", "trl"} and qlora.ref == "bnb_peft"
    assert "thr" not in fam.plan("cuda", False)[0][1]
    # the same useful flops for every row; LoRA skips the frozen weights' gradients
    assert fam._flops("sft_lora", full["sft"]) < fam._flops("sft", full["sft"])
    assert fam._flops("dpo", full["dpo"]) > 2 * fam._flops("sft", full["sft"])
    with pytest.raises(ValueError, match="case_id"):
        fam.make_case("ppo", full["sft"], "fp32", "cpu")
    with pytest.raises(ValueError, match="B, T"):
        fam.make_case("sft", full["dpo"], "fp32", "cpu")
    with pytest.raises(ValueError, match="B, Tp, Tr"):
        fam.make_case("ppo_lora", full["sft"], "fp32", "cpu")
    with pytest.raises(ValueError, match="B, Tp, Tr"):
        fam.make_case("ppo_lora", full["dpo"], "fp32", "cpu")
    with pytest.raises(ValueError, match="B, T"):
        fam.make_case("sft", full["ppo_lora"], "fp32", "cpu")
    # a PPO iteration (generation, six more forwards, two backwards) is more than twice a
    # LoRA SFT step over as many tokens
    same_tokens = dict(full["sft"], B=8, T=128)
    assert fam._flops("ppo_lora", full["ppo_lora"]) > 2 * fam._flops("sft_lora", same_tokens)
    # no TRL row: trl has no PPOTrainer
    assert set(fam.make_case("ppo_lora", full["ppo_lora"], "fp32", "cpu").impls) == \
        {"kernelrl", "eager"}


@pytest.mark.parametrize("case_id", ["sft", "dpo_lora"])
def test_light_kernelrl_and_eager_steps_agree(fam, case_id):
    # The light case as run.py runs it: checked against eager (one step from the same start:
    # equal loss, parameters within 0.1% of the update), then timed round-robin.
    shape = _light(fam, case_id)
    case = fam.make_case(case_id, shape, "fp32", "cpu")
    rows = {r["impl"]: r for r in common.run_case(case, impls_filter={"kernelrl", "eager"},
                                                  reps=1, measure_memory=False)}
    assert set(rows) == {"kernelrl", "eager"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["shape"]["tok"] == 256


@pytest.mark.parametrize("case_id", ["dpo", "sft_lora"])
def test_check_passes_one_step_and_catches_two(fam, case_id):
    shape = fam._shape(case_id, "cpu", True)
    case = fam.make_case(case_id, shape, "fp32", "cpu")
    x = case.make_inputs(0)

    def detached(out):
        return tuple(t.detach() for t in out)

    ref = detached(case.impls["eager"].build()(x))
    step = case.impls["kernelrl"].build()
    once = detached(step(x))
    assert case.check(ref, once) is None
    problem = case.check(ref, (once[0] + 0.01, *once[1:]))
    assert problem and problem.startswith("loss"), problem
    twice = detached(step(x))            # the same live parameters, now two steps on
    problem = case.check(ref, (once[0], *twice[1:]))
    assert problem and "parameters after one step differ" in problem, problem


def test_ppo_case_checked_and_timed(fam):
    # run.py's path for the PPO case at a tiny shape: the check (eager's update replayed on
    # kernelrl's rollout) passes, then both rows are timed.
    shape = dict(PPO_TINY, tok=32, thr=2)
    case = fam.make_case("ppo_lora", shape, "fp32", "cpu")
    rows = {r["impl"]: r for r in common.run_case(case, reps=1, measure_memory=False)}
    assert set(rows) == {"kernelrl", "eager"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0


@pytest.fixture(scope="module")
def ppo_case(fam):
    """The tiny PPO case, its inputs and eager's own iteration (ref)."""
    case = fam.make_case("ppo_lora", dict(PPO_TINY), "fp32", "cpu")
    x = case.make_inputs(0)
    ref = tuple(t.detach() for t in case.impls["eager"].build()(x))
    return case, x, ref


def _detached(out):
    return tuple(t.detach() for t in out)


def test_ppo_check_replays_eager_on_the_rows_rollout(fam, ppo_case):
    case, x, ref = ppo_case
    seq = ref[-1]
    B, Tp, Tr = PPO_TINY["B"], PPO_TINY["Tp"], PPO_TINY["Tr"]
    assert tuple(seq.shape) == (B, Tp + Tr)
    assert seq[:, :Tp].tolist() == x["prompts"].tolist()
    step = case.impls["kernelrl"].build()
    once = _detached(step(x))
    assert len(once) == len(ref) and tuple(once[-1].shape) == (B, Tp + Tr)
    assert case.check(ref, once) is None
    problem = case.check(ref, (once[0] + 0.01, *once[1:]))
    assert problem and problem.startswith("loss"), problem
    # the update is judged on the row's own rollout: other response tokens, another update
    other = once[-1].clone()
    other[:, Tp:] = (other[:, Tp:] + 1) % PPO_TINY["V"]
    problem = case.check(ref, (*once[:-1], other))
    assert problem and ("loss" in problem or "parameters" in problem), problem
    problem = case.check(ref, (*once[:-1], once[-1][:, :Tp + 1]))
    assert problem and "rollout" in problem, problem
    twice = _detached(step(x))           # the same live parameters, now two iterations on
    problem = case.check(ref, (once[0], *twice[1:-1], once[-1]))
    assert problem and "parameters after one step differ" in problem, problem


def test_ppo_check_catches_another_kl_coefficient(fam, ppo_case, monkeypatch):
    # the adapters start with B != 0, so the KL penalty is live at the first iteration: a
    # kernelrl update with another beta moves the parameters elsewhere than eager's replay
    case, x, ref = ppo_case
    monkeypatch.setattr(fam.steps_ppo, "KL_COEF", 5 * fam.steps_ppo.KL_COEF)
    step = case.impls["kernelrl"].build()            # its PPOConfig takes beta now
    monkeypatch.undo()
    out = _detached(step(x))
    problem = case.check(ref, out)
    assert problem and ("loss" in problem or "parameters" in problem), problem


# QLoRA cases small enough for a test (seconds): 1 layer, 1 head, I a multiple of 64.
MODEL_TINY = {"H": 64, "I": 192, "L": 1, "V": 512}
QLORA_TINY = {"sft_qlora": {"B": 2, "T": 16, **MODEL_TINY},
              "dpo_qlora": {"P": 1, "Tp": 8, "Tr": 8, **MODEL_TINY}}
needs_bnb = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("bitsandbytes", "peft")),
    reason="bitsandbytes or peft not installed")


@needs_bnb
def test_qlora_rows_dequantize_to_the_same_weights(fam):
    # bnb_peft's Linear4bit layers hold kernelrl's NF4 state: the same Ŵ bit for bit as the
    # kernelrl row's NF4 layers, and the same unquantized weights
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from kernelrl.nn import NF4Linear
    from kernelrl.train.common import make_trainable

    shape = QLORA_TINY["sft_qlora"]
    bnb = fam.steps_qlora.bnb_model(shape, "cpu")
    ours = make_trainable(fam.llama(shape, "cpu"), lora_r=fam.LORA_R,
                          lora_targets=",".join(fam.LORA_TARGETS), qlora=True)
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, NF4Linear)]
    assert len(layers) == len(fam.LORA_TARGETS)
    for name, m in layers:
        w = bnb.get_submodule(name.removesuffix(".base")).weight
        assert torch.equal(dequantize_4bit(w.data, w.quant_state), m.dequantized()), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(bnb.get_parameter(name), ours.get_parameter(name)), name


@needs_bnb
@pytest.mark.parametrize("case_id", ["sft_qlora", "dpo_qlora"])
def test_qlora_check_passes_one_step_and_catches_a_perturbed_side(fam, case_id,
                                                                  monkeypatch):
    case = fam.make_case(case_id, dict(QLORA_TINY[case_id]), "fp32", "cpu")
    x = case.make_inputs(0)
    ref = _detached(case.impls["bnb_peft"].build()(x))
    step = case.impls["kernelrl"].build()
    once = _detached(step(x))
    assert case.check(ref, once) is None
    problem = case.check(ref, (once[0] + 0.01, *once[1:]))
    assert problem and problem.startswith("loss") and "bnb_peft" in problem, problem
    twice = _detached(step(x))           # the same live adapters, now two steps on
    problem = case.check(ref, (once[0], *twice[1:]))
    assert problem and "parameters after one step differ from bnb_peft's" in problem, problem
    # bitsandbytes' side over other 4-bit weights: one layer's NF4 codes inverted
    # (code c -> 15 - c, about -w); DPO's first loss is log 2 whatever the weights (B = 0:
    # the policy is its reference), so there the adapters' update tells
    build = fam.steps_qlora.bnb_model

    def perturbed(shape, device):
        model = build(shape, device)
        model.model.layers[0].mlp.down_proj.weight.data.bitwise_not_()
        return model

    monkeypatch.setattr(fam.steps_qlora, "bnb_model", perturbed)
    other = _detached(case.impls["bnb_peft"].build()(x))
    problem = case.check(other, once)
    assert problem and ("loss" in problem or "parameters" in problem), problem


@needs_bnb
def test_qlora_case_checked_and_timed(fam):
    # run.py's path at a tiny shape: checked against bnb_peft (the case's reference), then
    # timed; TRL's row (its adapters cast back to fp32) agrees too where TRL is installed
    case = fam.make_case("sft_qlora", dict(QLORA_TINY["sft_qlora"], tok=32, thr=2), "fp32",
                         "cpu")
    rows = {r["impl"]: r for r in common.run_case(case, reps=1, measure_memory=False)}
    assert set(rows) == {"kernelrl", "bnb_peft", "trl"}
    for impl, r in rows.items():
        if impl == "trl" and importlib.util.find_spec("trl") is None:
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0


# An MoE step small enough for a test (seconds): Mixtral of 2 layers, 1 head, 8 experts of
# 128, top-2; its routing at seed 0 has no near-tie (smallest gap 7e-4).
MOE_TINY = {"B": 2, "T": 32, "H": 64, "I": 128, "L": 2, "E": 8, "K": 2, "V": 512}


@pytest.fixture(scope="module")
def moe_case(fam):
    """The tiny MoE case, its inputs, eager's step (ref) and kernelrl's one step (once)."""
    case = fam.make_case("sft_moe", dict(MOE_TINY), "fp32", "cpu")
    x = case.make_inputs(0)
    ref = _detached(case.impls["eager"].build()(x))
    step = case.impls["kernelrl"].build()
    return case, x, ref, step, _detached(step(x))


def test_moe_check_passes_one_step_and_catches_a_perturbed_side(fam, moe_case,
                                                               monkeypatch):
    case, x, ref, step, once = moe_case
    assert case.check(ref, once) is None
    problem = case.check(ref, (once[0] + 0.01, *once[1:]))
    assert problem and problem.startswith("loss"), problem
    # the parameters are all of the model's: experts and routers too
    names = sorted(fam.steps_common.canonical(n) for n, _ in
                   fam.steps_moe.mixtral(MOE_TINY, "cpu").named_parameters())
    assert len(once) == 1 + len(names)
    assert sum(n.endswith("mlp.gate.weight") for n in names) == MOE_TINY["L"]
    # kernelrl's side without the router aux loss: the loss is short of c·aux (c = 0.02)
    from kernelrl.train.common import RouterAux
    monkeypatch.setattr(RouterAux, "add", lambda self, loss, stats, **kw: (loss, stats))
    no_aux = _detached(case.impls["kernelrl"].build()(x))
    monkeypatch.undo()
    problem = case.check(ref, no_aux)
    assert problem and problem.startswith("loss"), problem
    assert 0.02 < ref[0].item() - no_aux[0].item() < 0.1          # 0.02 x aux, aux ~ K
    # eager's side with another coefficient (its config's router_aux_loss_coef)
    monkeypatch.setattr(fam.steps_moe, "AUX_COEF", 0.2)
    other = _detached(case.impls["eager"].build()(x))
    monkeypatch.undo()
    problem = case.check(other, once)
    assert problem and problem.startswith("loss"), problem
    # the router's weights after the step follow the aux term: a kernelrl step whose aux
    # loss is off and whose NLL is shifted to eager's moves the routers elsewhere
    problem = case.check(ref, (ref[0], *no_aux[1:]))
    assert problem and "parameters after one step differ" in problem, problem
    twice = _detached(step(x))           # the same live parameters, now two steps on
    problem = case.check(ref, (once[0], *twice[1:]))
    assert problem and "parameters after one step differ" in problem, problem


def test_moe_routing_alike_and_near_ties_refused(fam, moe_case, monkeypatch):
    case, x, ref, _, once = moe_case
    moe = fam.steps_moe
    seen = moe.routing(moe.mixtral(MOE_TINY, "cpu"), x["batch"], MOE_TINY["K"], "cpu")
    assert seen["same"] and seen["diff"] < 1e-7 and seen["gap"] > 100 * moe.ROUTING_GAP
    # the check refuses to judge a step whose routing could flip by rounding
    monkeypatch.setattr(moe, "ROUTING_GAP", 1.0)
    check = fam.make_case("sft_moe", dict(MOE_TINY), "fp32", "cpu").check
    problem = check(ref, once)
    assert problem and problem.startswith("near-tie in routing"), problem
    monkeypatch.undo()
    # ... or whose sides route differently
    monkeypatch.setattr(moe, "routing", lambda *a: dict(seen, same=False))
    check = fam.make_case("sft_moe", dict(MOE_TINY), "fp32", "cpu").check
    problem = check(ref, once)
    assert problem and problem.startswith("routing differs"), problem


def test_moe_light_shape_has_no_near_tie(fam):
    # the light shape's batch, routed by the initial model: the same experts on both sides,
    # bit-equal router logits, and the smallest K-th to (K+1)-th gap far from a tie
    shape = fam._shape("sft_moe", "cpu", True)
    moe = fam.steps_moe
    seen = moe.routing(moe.mixtral(shape, "cpu"), fam._batch(shape, 0, "cpu"), shape["K"],
                       "cpu")
    assert seen["same"] and seen["diff"] == 0.0 and seen["gap"] > 100 * moe.ROUTING_GAP


def test_moe_case_checked_and_timed(fam):
    # run.py's path at the tiny shape: checked against eager, then timed; TRL's SFTTrainer
    # (which adds the config's router aux loss itself) agrees too where TRL is installed
    case = fam.make_case("sft_moe", dict(MOE_TINY, tok=64, thr=2), "fp32", "cpu")
    rows = {r["impl"]: r for r in common.run_case(case, reps=1, measure_memory=False)}
    assert set(rows) == {"kernelrl", "eager", "trl"}
    for impl, r in rows.items():
        if impl == "trl" and importlib.util.find_spec("trl") is None:
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
@pytest.mark.parametrize("case_id", ["sft", "dpo_lora"])
def test_trl_step_agrees_with_eager(fam, case_id):
    shape = _light(fam, case_id)
    case = fam.make_case(case_id, shape, "fp32", "cpu")
    x = case.make_inputs(0)
    ref = tuple(t.detach() for t in case.impls["eager"].build()(x))
    out = tuple(t.detach() for t in case.impls["trl"].build()(x))
    assert case.check(ref, out) is None


def _row(fam, case_id, impl, ms, mem, *, times=None):
    shape = dict(fam._target_shape(case_id), thr=2)
    return {"bench": "steps", "case": fam.CASE_NAMES[case_id], "shape": shape, "dtype": "fp32",
            "impl": impl, "median_ms": ms, "status": "ok", "spread": 0.01,
            "times_ms": times or [ms] * 5, "paired": True, "peak_mem_bytes": mem}


def test_cpu_targets_on_a_synthetic_report(fam):
    MiB = 2**20
    rows = [
        # SFT full: kernelrl faster, a third of eager's memory -> both MET
        _row(fam, "sft", "kernelrl", 2000.0, 700 * MiB),
        _row(fam, "sft", "eager", 3000.0, 2100 * MiB),
        _row(fam, "sft", "trl", 6000.0, 4000 * MiB),
        # DPO full: kernelrl slower, memory just over half -> both NOT MET
        _row(fam, "dpo", "kernelrl", 9000.0, 2300 * MiB),
        _row(fam, "dpo", "eager", 8000.0, 4400 * MiB),
        # DPO LoRA: eager's memory not measured -> memory NOT CHECKED; equal speed is MET
        _row(fam, "dpo_lora", "kernelrl", 6000.0, 1000 * MiB),
        _row(fam, "dpo_lora", "eager", 6000.0, None),
        # SFT LoRA: not run (a subset) -> NOT CHECKED
        # PPO: no CPU target; its tokens/s is printed on the GPU target's line
        _row(fam, "ppo_lora", "kernelrl", 4000.0, 300 * MiB),
        _row(fam, "ppo_lora", "eager", 8000.0, 700 * MiB),
        # QLoRA: no target, its tokens/s printed on a line of its own
        _row(fam, "sft_qlora", "kernelrl", 2000.0, 300 * MiB),
        _row(fam, "sft_qlora", "bnb_peft", 4000.0, 600 * MiB),
        # MoE: no target either
        _row(fam, "sft_moe", "kernelrl", 4000.0, 900 * MiB),
        _row(fam, "sft_moe", "eager", 5000.0, 1800 * MiB),
        _row(fam, "sft_moe", "trl", 8000.0, 2000 * MiB),
    ]
    rep = report.build_report(ENV, CEILINGS, rows)
    got = {t["target"]: t for t in fam.targets(rep)}
    status = {k: t["status"] for k, t in got.items()}

    def find(case_id, what):
        [key] = [k for k in got if fam.CASE_NAMES[case_id] in k and what in k]
        return key

    assert status[find("sft", "tokens/s")] == "MET"
    assert status[find("sft", "memory")] == "MET"
    assert status[find("dpo", "tokens/s")] == "NOT MET"
    assert status[find("dpo", "memory")] == "NOT MET"
    assert status[find("dpo_lora", "tokens/s")] == "MET"
    assert status[find("dpo_lora", "memory")] == "NOT CHECKED"
    assert status[find("sft_lora", "tokens/s")] == "NOT CHECKED"
    assert status[find("sft_lora", "memory")] == "NOT CHECKED"
    detail = got[find("sft", "tokens/s")]["detail"]
    # 4096 tokens in 2 s, 3 s and 6 s
    assert "tokens/s: kernelrl 2,048, eager 1,365, trl 683" in detail, detail
    assert "1/2" in got[find("sft", "memory")]["target"]
    gpu = [t for k, t in got.items() if k.startswith("GPU")]
    assert len(gpu) == 2
    assert all(t["status"] == "NOT CHECKED" and "CPU run" in t["detail"] for t in gpu)
    [ppo] = [t for t in gpu if "PPO" in t["target"]]
    assert "2x eager's tokens/s" in ppo["target"], ppo
    # 1024 tokens in 4 s and 8 s
    assert "tokens/s: kernelrl 256, eager 128" in ppo["detail"], ppo
    qlora = [t for k, t in got.items() if "QLoRA" in k]
    assert [t["status"] for t in qlora] == ["NOT CHECKED"] * 2
    assert all("no target" in t["target"] for t in qlora)
    assert "tokens/s: kernelrl 2,048, bnb_peft 1,024" in qlora[0]["detail"], qlora
    assert "no rows at the full shape" in qlora[1]["detail"], qlora
    [moe] = [t for k, t in got.items() if fam.CASE_NAMES["sft_moe"] in k]
    assert moe["status"] == "NOT CHECKED" and "no target" in moe["target"], moe
    # 4096 tokens in 4 s, 5 s and 8 s
    assert "tokens/s: kernelrl 1,024, eager 819, trl 512" in moe["detail"], moe
    assert len(got) == 13


def test_gpu_targets_on_a_synthetic_report(fam):
    MiB = 2**20
    rows = [_row(fam, "dpo", "kernelrl", 100.0, 1000 * MiB),
            _row(fam, "dpo", "trl", 160.0, 2500 * MiB),
            _row(fam, "dpo_lora", "kernelrl", 100.0, 1000 * MiB),
            _row(fam, "dpo_lora", "trl", 140.0, 1500 * MiB),
            _row(fam, "ppo_lora", "kernelrl", 100.0, 1000 * MiB),
            _row(fam, "ppo_lora", "eager", 250.0, 1800 * MiB)]
    for r in rows:
        r["shape"].pop("thr")
    rep = report.build_report(dict(ENV, device_kind="cuda"), CEILINGS, rows)
    got = {t["target"]: t["status"] for t in fam.targets(rep)}
    assert len(got) == 9 and not any(k.startswith("CPU") for k in got)
    assert sum("QLoRA" in k and "no target" in k for k in got) == 2
    assert sum("MoE" in k and "no target" in k for k in got) == 1
    full, lora = fam.CASE_NAMES["dpo"], fam.CASE_NAMES["dpo_lora"]
    assert got[f"GPU {full} (full shape): kernelrl >= 1.5x TRL's tokens/s"] == "MET"
    assert got[f"GPU {full} (full shape): kernelrl peak memory <= 1/2 of TRL's"] == "MET"
    assert got[f"GPU {lora} (full shape): kernelrl >= 1.5x TRL's tokens/s"] == "NOT MET"
    assert got[f"GPU {lora} (full shape): kernelrl peak memory <= 1/2 of TRL's"] == "NOT MET"
    ppo = fam.CASE_NAMES["ppo_lora"]
    assert got[f"GPU {ppo} (full shape): kernelrl >= 2x eager's tokens/s"] == "MET"
    assert got[f"GPU {ppo} (full shape): kernelrl peak memory <= 1/2 of eager's"] == "NOT MET"
