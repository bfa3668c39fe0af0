"""The trainers on a tiny random Mixtral (CPU, fp32): with --moe-kernels (the default) its
sparse blocks run on kernelrl's SparseMoE, and a step matches the one transformers' own
blocks take (--no-moe-kernels); --router-aux-coef adds coef x the logged aux_loss to the
loss (by default the config's router_aux_loss_coef); LoRA leaves the experts frozen. SFT
and DPO are checked step for step, RM, GRPO and PPO for the aux term of their loss."""

import math

import pytest
import torch
from safetensors.torch import load_file

import train_helpers
from dpo_helpers import pair_examples
from rl_helpers import prompt_rows
from train_helpers import (cli_args, sft_examples, write_jsonl, write_mixtral_folder,
                           write_qwen3_moe_folder)
from kernelrl.train import dpo, grpo, ppo, rm, sft
from kernelrl.train.metrics import read_metrics
from numerics import rel_err

one_thread = train_helpers.one_thread     # the shared fixture, in use in this module
COEF = 0.02                               # the tiny model's router_aux_loss_coef


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny Mixtral's folder and the data files of each trainer."""
    root = tmp_path_factory.mktemp("moe")
    return {"model": write_mixtral_folder(root / "mixtral", initializer_range=0.2,
                                          router_aux_loss_coef=COEF),
            "sft": write_jsonl(root / "sft.jsonl", sft_examples(8, seed=0)),
            "pairs": write_jsonl(root / "pairs.jsonl", pair_examples(8, seed=0)),
            "prompts": write_jsonl(root / "prompts.jsonl", prompt_rows(8, seed=0))}


def _run(module, data, kind, out, *flags, capsys=None):
    """One optimizer step of ``module``'s trainer; returns (its training record, log)."""
    args = cli_args(data["model"], data[kind], out, "--device", "cpu", "--lr", "1e-2",
                    "--seed", 3, "--max-steps", 1, "--batch-size", 4, *flags)
    code = module.main(args)
    err = capsys.readouterr().err if capsys is not None else ""
    assert code == 0, err
    (record,) = [r for r in read_metrics(out) if "loss" in r]
    return record, err


def _final(out):
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        if (out / name).is_file():
            return load_file(str(out / name))
    raise AssertionError(f"no exported model in {out}")


def _assert_same_step(a, b, a_out, b_out, atol=1e-5):
    """Two runs' first step: the same loss and gradient norm (fp32 rounding), and the same
    weights after the update (as exported: the same file keys either way), within 1e-3 of
    the step size --lr: AdamW's first step is lr·g/(|g| + ε), so where a gradient entry is
    near ε = 1e-8 its rounding moves the update by a visible fraction of lr."""
    assert rel_err(torch.tensor(a["loss"]), torch.tensor(b["loss"])) < 1e-5
    assert rel_err(torch.tensor(a["grad_norm"]), torch.tensor(b["grad_norm"])) < 1e-5
    wa, wb = _final(a_out), _final(b_out)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol)


@pytest.mark.parametrize("module, kind", [(sft, "sft"), (dpo, "pairs")])
def test_a_step_on_the_kernels_matches_transformers_blocks(module, kind, data, tmp_path,
                                                           capsys):
    hf, hf_log = _run(module, data, kind, tmp_path / "hf", "--no-moe-kernels", capsys=capsys)
    assert "MoE: 2 blocks on transformers' own" in hf_log
    assert "router aux loss: off (--no-moe-kernels)" in hf_log and "aux_loss" not in hf
    ours, log = _run(module, data, kind, tmp_path / "ours", "--router-aux-coef", 0,
                     capsys=capsys)
    assert "MoE: 2 blocks on kernelrl's kernels" in log and "aux_loss" not in ours
    _assert_same_step(ours, hf, tmp_path / "ours", tmp_path / "hf")
    if module is dpo:
        assert abs(ours["loss"] - math.log(2)) < 1e-6      # the patched copy as reference

    # The default coefficient is the config's: the loss grows by exactly COEF x aux_loss.
    aux, log = _run(module, data, kind, tmp_path / "aux", capsys=capsys)
    assert f"router aux loss: {COEF:g} x the load-balancing loss (the config's " in log
    assert aux["aux_loss"] > 0
    assert abs(aux["loss"] - (ours["loss"] + COEF * aux["aux_loss"])) < 2e-6
    big, _ = _run(module, data, kind, tmp_path / "big", "--router-aux-coef", 0.5)
    assert abs(big["aux_loss"] - aux["aux_loss"]) < 1e-6        # same forward, same aux
    assert abs(big["loss"] - (ours["loss"] + 0.5 * big["aux_loss"])) < 2e-6
    before = _final(tmp_path / "ours")
    after = _final(tmp_path / "big")
    router = "model.layers.0.block_sparse_moe.gate.weight"      # the file's (v4) key
    assert not torch.equal(after[router], before[router])      # the aux term trains it


def test_lora_keeps_the_experts_frozen_and_aux_still_counts(data, tmp_path, capsys):
    record, log = _run(sft, data, "sft", tmp_path / "lora", "--lora-r", 4,
                       "--lora-targets", "all-linear", capsys=capsys)
    assert "LoRA on" in log and "MoE: 2 blocks on kernelrl's kernels" in log
    assert record["aux_loss"] > 0
    keys = _final(tmp_path / "lora").keys()
    assert keys and not any("experts" in k or "mlp.gate" in k for k in keys)


@pytest.mark.parametrize("kernels", [True, False])
def test_the_frozen_reference_copy_runs_the_policys_blocks(data, kernels):
    """PPO's, GRPO's and DPO's frozen reference (common.frozen_copy) is patched exactly
    when the policy is, so that both compute with the same numerics."""
    from kernelrl.nn import SparseMoE
    from kernelrl.train import common
    cfg = dpo.DPOConfig(model=str(data["model"]), data="d", out="o", moe_kernels=kernels)
    copy = common.frozen_copy(cfg, "cpu")
    blocks = [m for m in copy.modules() if isinstance(m, SparseMoE)]
    assert len(blocks) == (2 if kernels else 0)
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())


def test_the_flags_and_their_help(capsys):
    text = " ".join(train_helpers.help_text(sft, capsys).split())
    assert "--moe-kernels, --no-moe-kernels run a mixture-of-experts model's sparse" in text
    assert "(default: true)" in text
    assert "--router-aux-coef FLOAT weight of the MoE router's load-balancing loss" in text
    cfg = sft.SFTConfig(model="m", data="d", out="o")
    assert cfg.moe_kernels is True and cfg.router_aux_coef is None


def test_router_aux_coef_needs_a_patched_moe_model(data, tmp_path, capsys):
    args = cli_args(data["model"], data["sft"], tmp_path / "x", "--device", "cpu",
                    "--max-steps", 1, "--no-moe-kernels", "--router-aux-coef", 0.1)
    assert sft.main(args) == 1
    assert ("--router-aux-coef 0.1: its MoE blocks run on transformers' own code "
            "(--no-moe-kernels)" in capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        sft.main(cli_args(data["model"], data["sft"], tmp_path / "y", "--router-aux-coef", -1))
    assert exit_info.value.code == 2
    assert "--router-aux-coef: expected a finite number >= 0, got -1.0" in capsys.readouterr().err
    llama = train_helpers.write_model_folder(tmp_path / "llama")
    assert sft.main(cli_args(llama, data["sft"], tmp_path / "z", "--device", "cpu",
                             "--max-steps", 1, "--router-aux-coef", 0.1)) == 1
    assert "the model has no mixture-of-experts blocks" in capsys.readouterr().err


RL = {"grpo": (grpo, ("--group-size", 2)), "ppo": (ppo, ())}


@pytest.mark.parametrize("name", ["rm", "grpo", "ppo"])
def test_the_other_trainers_add_the_aux_term(name, data, tmp_path):
    if name == "rm":
        module, kind, flags = rm, "pairs", ()
    else:
        module, extra = RL[name]
        kind = "prompts"
        flags = ("--reward-fn", "rl_helpers:marker_reward", "--max-new-tokens", 6,
                 "--num-ppo-epochs", 1, *extra)       # one update: the loss before it
    off, _ = _run(module, data, kind, tmp_path / "off", *flags, "--router-aux-coef", 0)
    on, _ = _run(module, data, kind, tmp_path / "on", *flags, "--router-aux-coef", 0.5)
    assert "aux_loss" not in off and on["aux_loss"] > 0
    assert abs(on["loss"] - (off["loss"] + 0.5 * on["aux_loss"])) < 1e-5


def test_qwen3_moe_trains_through_sft_and_grpo(data, tmp_path, capsys):
    """Qwen3-MoE's blocks (top-4 of 8, weights not renormalised) through the loop: SFT on
    the kernels matches transformers' blocks, and GRPO runs with the aux term and a frozen
    reference whose log-probs equal the sampling policy's at the first step."""
    model = write_qwen3_moe_folder(tmp_path / "qwen3")
    qdata = {**data, "model": model}
    hf, _ = _run(sft, qdata, "sft", tmp_path / "hf", "--no-moe-kernels", capsys=capsys)
    ours, log = _run(sft, qdata, "sft", tmp_path / "ours", "--router-aux-coef", 0,
                     capsys=capsys)
    assert "MoE: 2 blocks on kernelrl's kernels" in log
    _assert_same_step(ours, hf, tmp_path / "ours", tmp_path / "hf")
    record, log = _run(grpo, qdata, "prompts", tmp_path / "grpo", "--reward-fn",
                       "rl_helpers:marker_reward", "--max-new-tokens", 6, "--group-size", 2,
                       "--kl-loss-coef", 0.05, capsys=capsys)
    assert "reference: a frozen copy of" in log and record["aux_loss"] > 0
    assert record["kl"] == 0.0
