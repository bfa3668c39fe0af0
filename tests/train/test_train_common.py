"""kernelrl.train.common: the LR schedule (hand-computed), AdamW groups, clipping, device
and seeding, model setup (full, LoRA, named adapters), the run folder, checkpoint round
trips, export, the shared settings and the per-step bookkeeping; and, for every trainer
(SFT, reward model, DPO) through its command line, errors that leave an existing run
alone and a diverged loss stopping the run with its step named."""

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_helpers
from dpo_helpers import pair_examples
from rm_helpers import ranked_examples
from train_helpers import (VOCAB, cli_args, help_text, patch_from_call, sft_examples,
                           snapshot, write_jsonl)
from kernelrl.models.hf import load_model
from kernelrl.train import common, dpo, grpo, ppo, rm, sft
from kernelrl.train.checkpoint import Checkpoint, CheckpointError, find_latest, load_checkpoint
from kernelrl.train.config import config_from_args
from kernelrl.train.metrics import NonFiniteLossError, RunLogger, read_metrics

one_thread = train_helpers.one_thread     # the shared fixtures, in use in this module
model_dir = train_helpers.model_dir


@dataclass
class RunConfig:
    out: str
    lr: float = 1e-3
    resume: str | None = None


# ----------------------------------------------------------------------------------------
# Learning-rate schedule


def test_lr_factor_by_hand():
    # W = 2 warmup steps of S = 6: 1/2, 2/2, then cos over the 4 remaining steps.
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                0.5 * (1 + math.cos(3 * math.pi / 4))]
    got = [common.lr_factor(s, 2, 6) for s in range(6)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[3] == pytest.approx(0.8535533905932737)
    # a floor: m + (1 - m) * cosine
    assert common.lr_factor(4, 2, 6, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    # no warmup: the first step is at the peak
    assert common.lr_factor(0, 0, 10) == 1.0


def test_warmup_cosine_drives_the_optimizer_and_checkpoints_as_json():
    param = torch.nn.Parameter(torch.zeros(3, 3))
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = common.warmup_cosine(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * common.lr_factor(s, 2, 6) for s in range(6)])
    state = sched.state_dict()
    assert json.loads(json.dumps(state))["last_epoch"] == 6      # numbers only


def test_warmup_steps_from_steps_or_ratio():
    assert common.warmup_steps_for(5, 0.0, 100) == 5
    assert common.warmup_steps_for(0, 0.1, 95) == 10                   # round(9.5)
    assert common.warmup_steps_for(50, 0.0, 10) == 10                  # at most S
    with pytest.raises(ValueError, match="--warmup-steps 3 and --warmup-ratio 0.1"):
        common.warmup_steps_for(3, 0.1, 100)
    with pytest.raises(ValueError, match="--warmup-ratio"):
        common.warmup_steps_for(0, 1.5, 100)


# ----------------------------------------------------------------------------------------
# Optimizer, clipping, autocast, device, seeds


def test_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(True)
    opt = common.build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.ndim for p in decay["params"]] == [2]
    assert sorted(p.numel() for p in no_decay["params"]) == [4, 4, 4]
    with pytest.raises(ValueError, match="--lr"):
        common.build_optimizer(model, lr=0.0)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        common.build_optimizer(frozen, lr=1e-3)


def test_clip_gradients_returns_the_norm_before_clipping():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = common.clip_gradients([a, b], 1.0)
    assert norm.item() == pytest.approx(5.0)
    total = torch.cat([a.grad, b.grad]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert common.clip_gradients([a, b], 0).item() == pytest.approx(5.0)   # 0: no clipping
    assert a.grad.tolist() == [3.0, 0.0] and b.grad.tolist() == [4.0]


def test_autocast_kinds():
    device = torch.device("cpu")
    x = torch.randn(2, 2)
    with common.autocast(device, "none"):
        assert (x @ x).dtype == torch.float32
    with common.autocast(device, "bfloat16"):
        assert (x @ x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--autocast"):
        common.autocast(device, "float8")


def test_choose_device():
    assert common.choose_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert common.choose_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda"):
            common.choose_device("cuda")
    with pytest.raises(ValueError, match="--device"):
        common.choose_device("tpu")


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(()).item()

    common.seed_everything(7)
    first = draw()
    common.seed_everything(7)
    assert draw() == first
    common.seed_everything(8)
    assert draw() != first


def test_parse_targets():
    assert common.parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert common.parse_targets("all-linear") == "all-linear"
    with pytest.raises(ValueError, match="--lora-targets"):
        common.parse_targets(" , ")


# ----------------------------------------------------------------------------------------
# The model


def test_setup_model_full_and_lora(model_dir):
    full = common.setup_model(model_dir)
    state = common.trainable_state(full)
    assert full.training
    assert set(state) == {n for n, _ in full.named_parameters()}
    assert state["model.embed_tokens.weight"] is full.model.embed_tokens.weight   # live

    lora = common.setup_model(model_dir, lora_r=4, lora_alpha=8, lora_targets="q_proj,v_proj")
    names = sorted(common.trainable_state(lora))
    assert len(names) == 2 * 2 * 2                    # 2 layers x (q, v) x (A, B)
    assert all(".lora.A." in n or ".lora.B." in n for n in names)
    assert "LoRA on 4 layers" in common.describe_model(lora)
    assert [id(p) for p in common.trainable_parameters(lora)] == \
        [id(p) for p in common.trainable_state(lora).values()]


def test_gradient_checkpointing_gives_the_same_lora_gradients(model_dir):
    from kernelrl.models.logprobs import token_logprobs

    ids = torch.randint(4, len(VOCAB), (2, 7), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        common.seed_everything(0)
        model = common.setup_model(model_dir, lora_r=2, gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False)
                   for m in model.modules()) == checkpointing
        token_logprobs(model, ids, reduction="sum").backward()
        grads.append([p.grad for p in common.trainable_parameters(model)])
    assert all(g is not None for g in grads[1])        # frozen inputs: still differentiated
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)


def test_make_trainable_on_a_reward_model(model_dir):
    from kernelrl.models.reward import RewardModel

    reward = RewardModel.from_causal_lm(load_model(model_dir))
    common.make_trainable(reward, lora_r=2, lora_targets="q_proj",
                          gradient_checkpointing=True)
    assert reward.training and reward.decoder.is_activation_checkpointing
    assert all(".lora." in n for n in common.trainable_state(reward))
    reward.score.requires_grad_(True)                   # the caller trains the head too
    assert "score.weight" in common.trainable_state(reward)
    with pytest.raises(ValueError, match="--gradient-checkpointing"):
        common.make_trainable(torch.nn.Linear(2, 2), gradient_checkpointing=True)


def test_setup_model_errors_name_the_flag(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="--model"):
        common.setup_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--lora-r"):
        common.setup_model(model_dir, lora_r=-1)
    with pytest.raises(ValueError, match="--dtype"):
        common.setup_model(model_dir, dtype="int8")


# ----------------------------------------------------------------------------------------
# Run folder, checkpoints, export


def _one_step(model, optimizer, scheduler, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(4, len(VOCAB), (2, 6))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_start_run_guards_the_folder_and_write_config(tmp_path, capsys):
    out = tmp_path / "run"
    run_dir, ckpt = common.start_run(out, None)
    assert run_dir == out and ckpt is None and out.is_dir() and not any(out.iterdir())
    common.write_config(out, RunConfig(str(out)))
    assert "lr = 0.001" in (out / common.CONFIG_FILE).read_text()

    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    sched = common.warmup_cosine(opt, warmup_steps=0, total_steps=4)
    common.save_state(out, 1, model=layer, optimizer=opt, scheduler=sched,
                      data_state={"epoch": 0}, extra={"x": 1})
    with pytest.raises(CheckpointError, match="already holds"):
        common.start_run(out, None)
    _, ckpt = common.start_run(out, "latest")
    assert ckpt.step == 1 and ckpt.data == {"epoch": 0} and ckpt.extra == {"x": 1}
    capsys.readouterr()
    common.write_config(out, RunConfig(str(out), lr=2e-3, resume="latest"), resumed=True)
    assert "lr: 0.001 -> 0.002" in capsys.readouterr().err      # resume itself not listed
    assert "lr = 0.002" in (out / common.CONFIG_FILE).read_text()
    _, ckpt = common.start_run(out, str(out))
    assert ckpt.step == 1
    assert common.resume_target(None) is None and common.resume_target("latest") is True


def test_save_state_and_restore_are_bitwise_for_lora(tmp_path, model_dir):
    def build():
        common.seed_everything(0)
        model = common.setup_model(model_dir, lora_r=4, lora_dropout=0.1)
        opt = common.build_optimizer(model, lr=1e-2, weight_decay=0.01)
        sched = common.warmup_cosine(opt, warmup_steps=1, total_steps=5)
        return model, opt, sched

    model, opt, sched = build()
    _one_step(model, opt, sched)
    common.save_state(tmp_path, 1, model=model, optimizer=opt, scheduler=sched,
                      data_state={"p": 1}, extra={"tokens_seen": 5})
    saved = load_file(str(tmp_path / "checkpoints" / "step-1" / "model.safetensors"))
    assert set(saved) == set(common.trainable_state(model))      # adapters only
    after = torch.rand(())                                       # the RNG right after saving
    _one_step(model, opt, sched, seed=1)

    model2, opt2, sched2 = build()
    step, data, extra = common.restore(load_checkpoint(tmp_path), model2, opt2, sched2)
    assert (step, data, extra) == (1, {"p": 1}, {"tokens_seen": 5})
    assert torch.equal(torch.rand(()), after)
    _one_step(model2, opt2, sched2, seed=1)
    for (name, a), (_, b) in zip(common.trainable_state(model).items(),
                                 common.trainable_state(model2).items()):
        assert torch.equal(a, b), name
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert common.restore(None, model2, opt2, sched2) == (0, None, {})


def test_restore_refuses_another_model(tmp_path, model_dir):
    full = common.setup_model(model_dir)
    opt = common.build_optimizer(full, lr=1e-3)
    sched = common.warmup_cosine(opt, warmup_steps=0, total_steps=2)
    common.save_state(tmp_path, 1, model=full, optimizer=opt, scheduler=sched, data_state=None)
    lora = common.setup_model(model_dir, lora_r=2)
    opt2 = common.build_optimizer(lora, lr=1e-3)
    sched2 = common.warmup_cosine(opt2, warmup_steps=0, total_steps=2)
    with pytest.raises(CheckpointError, match="--lora"):
        common.restore(load_checkpoint(tmp_path), lora, opt2, sched2)


def test_export_full_model_and_lora_adapter(tmp_path, model_dir):
    full = common.setup_model(model_dir)
    with torch.no_grad():
        full.model.norm.weight.add_(1.0)
    folder = common.export_model(full, tmp_path / "a")
    assert folder == tmp_path / "a" / common.MODEL_DIR
    reloaded = load_model(folder)
    assert torch.equal(reloaded.model.norm.weight, full.model.norm.weight)

    lora = common.setup_model(model_dir, lora_r=2, lora_alpha=4, lora_targets="q_proj")
    folder = common.export_model(lora, tmp_path / "b", base_model=model_dir)
    assert folder == tmp_path / "b" / common.ADAPTER_DIR
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 4, ["q_proj"])
    assert config["base_model_name_or_path"] == str(model_dir.resolve())
    assert (folder / "adapter_model.safetensors").is_file()


def test_named_adapters_two_on_one_base_and_export_one(tmp_path, model_dir):
    """adapter_name: a PPO trainer's policy and value adapters on one base, each trained,
    the first one active; export_model writes the one asked for, which loads back."""
    from kernelrl.models.lora import active_adapter, adapter_names, load_adapter

    model = common.setup_model(model_dir, lora_r=2, lora_targets="q_proj",
                               adapter_name="policy")
    common.make_trainable(model, lora_r=4, lora_targets="q_proj,v_proj", adapter_name="value")
    assert adapter_names(model) == ["policy", "value"] and active_adapter(model) == "policy"
    names = list(common.trainable_state(model))
    assert len(names) == 2 * (2 + 4) and {".policy" in n for n in names} == {True, False}
    with torch.no_grad():
        for name, p in common.trainable_state(model).items():
            p.add_(0.5 if ".value" in name else 0.0)
    folder = common.export_model(model, tmp_path, base_model=model_dir, adapter_name="value")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], sorted(config["target_modules"])) == (4, ["q_proj", "v_proj"])
    loaded = load_adapter(common.setup_model(model_dir), folder, "value")
    for key, value in common.trainable_state(loaded).items():
        assert torch.equal(value, common.trainable_state(model)[key]), key
    with pytest.raises(ValueError, match="adapter_name"):
        common.export_model(model, tmp_path / "b", adapter_name="reward")


# ----------------------------------------------------------------------------------------
# The shared settings and the per-step bookkeeping


def _settings(**changes) -> common.TrainConfig:
    return dataclasses.replace(common.TrainConfig(model="m", data="d", out="o"), **changes)


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "--batch-size: expected an int >= 1, got 0"),
    ({"max_length": 1}, "--max-length: expected an int >= 2, got 1"),
    ({"epochs": True}, "--epochs: expected an int >= 1, got True"),
    ({"max_steps": 0}, "--max-steps: expected an int >= 1 or none, got 0"),
    ({"lr": math.inf}, "--lr: expected a finite number > 0, got inf"),
    ({"min_lr_ratio": 1.5}, "--min-lr-ratio: expected a number in [0, 1], got 1.5"),
    ({"lora_dropout": 1.0}, "--lora-dropout: expected a number in [0, 1), got 1.0"),
    ({"overlong": "cut"}, "--overlong: expected one of"),
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "--warmup-steps 2 and --warmup-ratio 0.1"),
    ({"eval_data": "e", "eval_fraction": 0.1}, "--eval-data and --eval-fraction: give one"),
    ({"eval_every": 5}, "--eval-every 5: there is no held-out data to evaluate on; give "
                        "--eval-data or --eval-fraction"),
])
def test_validate_common_names_the_flag(changes, message):
    common.validate_common(_settings())
    common.validate_common(_settings(eval_every=5, eval_fraction=0.1))
    with pytest.raises(ValueError) as info:
        common.validate_common(_settings(**changes))
    assert message in str(info.value)


@pytest.mark.parametrize("module, config", [(sft, sft.SFTConfig), (rm, rm.RMConfig),
                                            (dpo, dpo.DPOConfig)])
def test_trainer_configs_are_flat_with_the_shared_fields_first(module, config, capsys):
    """Each trainer's config holds every TrainConfig field, in TrainConfig's order, then
    its own; its command line (``main --help``) has one flag per field, in that order."""
    shared = [f.name for f in dataclasses.fields(common.TrainConfig)]
    names = [f.name for f in dataclasses.fields(config)]
    assert names[:len(shared)] == shared and len(names) > len(shared)
    listed = re.findall(r"^  (--[a-z-]+)", help_text(module, capsys), re.MULTILINE)
    assert listed == ["--config"] + ["--" + name.replace("_", "-") for name in names]
    default = {sft.SFTConfig: 2e-5, rm.RMConfig: 9e-6, dpo.DPOConfig: 1e-6}[config]
    assert config(model="m", data="d", out="o").lr == default


def test_an_inherited_config_round_trips_and_resume_lists_its_changes(tmp_path, capsys):
    cfg = sft.SFTConfig(model="m", data="d", out=str(tmp_path), lr=1e-2, packing=True,
                        eval_fraction=0.1, eval_every=3)
    path = common.write_config(tmp_path, cfg)
    assert config_from_args(sft.SFTConfig, ["--config", str(path)]) == cfg
    capsys.readouterr()
    common.write_config(tmp_path, dataclasses.replace(cfg, lr=2e-2, batch_size=2, packing=False,
                                                      resume="latest"), resumed=True)
    err = capsys.readouterr().err
    assert "batch_size: 4 -> 2; lr: 0.01 -> 0.02; packing: True -> False" in err


class _Loader:
    """What Bookkeeper uses of a BatchLoader: the steps of an epoch, the data position."""

    def __init__(self, steps: int):
        self.steps, self.position = steps, 0

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict:
        return {"position": self.position}


def test_bookkeeper_logs_evaluates_and_saves_on_the_cadence(tmp_path):
    """5 steps, --log-every 2, --eval-every 3, --save-every 4: records at 2 (steps 1-2
    averaged), 3 (an evaluation), 4 and 5 (the last, evaluated); checkpoints at 4 and 5
    with the data position and tokens_seen continued from the resumed run's."""
    cfg = _settings(log_every=2, eval_every=3, save_every=4, keep_checkpoints=5,
                    batch_size=2, grad_accum=3)
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    scheduler = common.warmup_cosine(optimizer, warmup_steps=0, total_steps=5)
    loader, evals = _Loader(steps=4), []

    def evaluate():
        evals.append(1)
        return {"eval/loss": float(len(evals))}

    with RunLogger(tmp_path, 5, tensorboard=False) as logger:
        books = common.Bookkeeper(logger, tmp_path, cfg, 5, model=layer, optimizer=optimizer,
                                  scheduler=scheduler, loader=loader, evaluate=evaluate,
                                  extra={"tokens_seen": 100})
        for step in range(1, 6):
            loader.position = step
            books.end_step(step, 10 * step, lr=0.1 * step, grad_norm=1.0,
                           loss=float(step), accuracy=(step % 2, 2))
    records = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}
               for r in read_metrics(tmp_path)]
    common_keys = {"grad_norm": 1.0}
    assert records == [
        {"step": 2, "loss": 1.5, "accuracy": 0.25, "lr": 0.2, "tokens_seen": 130,
         "epoch": 0.5, **common_keys},
        {"step": 3, "loss": 3.0, "accuracy": 0.5, "lr": 0.30000000000000004,
         "tokens_seen": 160, "epoch": 0.75, "eval/loss": 1.0, **common_keys},
        {"step": 4, "loss": 4.0, "accuracy": 0.0, "lr": 0.4, "tokens_seen": 200, "epoch": 1.0,
         **common_keys},
        {"step": 5, "loss": 5.0, "accuracy": 0.5, "lr": 0.5, "tokens_seen": 250, "epoch": 1.25,
         "eval/loss": 2.0, **common_keys}]
    assert [list(r)[:3] for r in records] == [["step", "loss", "accuracy"]] * 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == \
        ["step-4", "step-5"]
    saved = load_checkpoint(tmp_path / "checkpoints" / "step-4")
    assert saved.data == {"position": 4} and saved.extra == {"tokens_seen": 200,
                                                             "step_batch": 6}


def test_check_step_batch_and_sync_and_check():
    cfg = _settings(batch_size=2, grad_accum=2)
    common.check_step_batch(None, cfg, "prompts")
    for extra in ({"step_batch": 4}, {"step_prompts": 4}, {}):     # step_prompts: older runs
        common.check_step_batch(Checkpoint("c", 3, {}, extra=extra), cfg, "prompts")
    with pytest.raises(CheckpointError, match="= 8 prompts per step, this one 4"):
        common.check_step_batch(Checkpoint("c", 3, {}, extra={"step_batch": 8}), cfg, "prompts")

    values, norm = common.sync_and_check(7, torch.tensor([2.0, 0.5]), torch.tensor(3.0))
    assert (values, norm) == ([2.0, 0.5], 3.0)
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf at step 7"):
        common.sync_and_check(7, torch.tensor(2.0), torch.tensor(math.inf))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7"):
        common.sync_and_check(7, torch.tensor([math.nan, 0.5]), torch.tensor(1.0))


# ----------------------------------------------------------------------------------------
# Every trainer through its command line


@dataclass(frozen=True)
class Trainer:
    """How the cross-trainer tests drive one trainer on the tiny model."""

    module: Any
    config: type
    rows: list            # training data: 24 or 32 examples
    settings: dict        # the flags of every run (--device cpu added)
    bad_rows: list        # data whose line 2 is wrong ...
    bad_message: str      # ... and what the error says after "<file>:2:"
    unit: str             # what --batch-size counts, as the resume error says it
    bad_settings: tuple   # (flags, what the error says): this trainer's own, exit 2
    poison: tuple         # (function of the module, its first call in step 3 at batch 8)
    run_flags: tuple = ()   # flags of the run the errors must leave alone ...
    run_files: tuple = ()   # ... and files it must have written


TRAINERS = {
    "sft": Trainer(
        sft, sft.SFTConfig, sft_examples(24, seed=0), {"lr": 1e-2, "seed": 3},
        [{"prompt": "count", "response": "one"}, "{not json"], " not valid JSON",
        "sequences", (), ("token_logprobs", 3)),
    "rm": Trainer(
        rm, rm.RMConfig, ranked_examples(32, seed=1), {"lr": 3e-3, "seed": 3},
        [{"prompt": "count", "chosen": "one", "rejected": "two"},
         {"prompt": "count", "chosen": "one", "rejected": 2}], "", "prompts",
        ((("--center-coef", -1), "--center-coef: expected a finite number"),
         (("--adapter-name", "my-rm"), "--adapter-name: expected a Python")),
        ("score_sequences", 3)),
    "dpo": Trainer(
        dpo, dpo.DPOConfig, pair_examples(24, seed=0), {"lr": 1e-2, "beta": 0.5, "seed": 3},
        [{"prompt": "count", "chosen": "one", "rejected": "two"},
         {"prompt": "count", "chosen": 3, "rejected": "two"}], ' "chosen" must be a string',
        "prompts",
        ((("--loss-type", "exo_pair"), "--label-smoothing: expected"),
         (("--loss-type", "robust", "--label-smoothing", 0.5), "--label-smoothing: expected"),
         (("--beta", 0), "--beta: expected"), (("--loss-type", "kto"), "--loss-type")),
        ("sequence_logprobs", 5),                   # reference, policy: 2 calls a step
        run_flags=("--ref", "precompute"), run_files=(dpo.REFERENCE_FILE,)),
    "grpo": Trainer(
        grpo, grpo.GRPOConfig, [{"prompt": e["prompt"]} for e in sft_examples(24, seed=0)],
        {"lr": 1e-2, "seed": 3, "reward_fn": "rl_helpers:marker_reward", "group_size": 2,
         "max_new_tokens": 4},
        [{"prompt": "count"}, {"prompt": 3}], ' "prompt" must be a string, got number',
        "prompts",
        ((("--group-size", 1), "--group-size: expected an int >= 2"),
         (("--reward-fn", "no_such_reward_module:f"), "--reward-fn: cannot import")),
        ("group_advantages", 3)),                   # one call a step
    "ppo": Trainer(
        ppo, ppo.PPOConfig, [{"prompt": e["prompt"]} for e in sft_examples(24, seed=0)],
        {"lr": 1e-2, "seed": 3, "reward_fn": "rl_helpers:marker_reward", "max_new_tokens": 4,
         "num_ppo_epochs": 1},
        [{"prompt": "count"}, {"prompt": 3}], ' "prompt" must be a string, got number',
        "prompts",
        ((("--kl-estimator", "k4"), "--kl-estimator: expected one of k1, k2, k3"),
         (("--adaptive-kl", "--kl-coef", 0), "--adaptive-kl: multiplies --kl-coef")),
        ("final_hidden_states", 5)),                # the values: rollout, update a step
}
# Bad settings every trainer refuses the same way (exit 2, naming the flags).
SHARED_BAD_SETTINGS = (
    (("--batch-size", 0), "--batch-size: expected an int >= 1, got 0"),
    (("--eval-every", 5), "--eval-every 5: there is no held-out data to evaluate on; give "
                          "--eval-data or --eval-fraction"),
    (("--warmup-steps", 2, "--warmup-ratio", 0.1), "give one or the other"),
    (("--qlora",), "--qlora: needs LoRA adapters to train over the 4-bit base"),
)


@pytest.mark.parametrize("name", TRAINERS)
def test_errors_leave_an_existing_run_alone(name, model_dir, tmp_path, capsys):
    """A finished 2-step run, then bad data and a missing model (status 1), a config file
    with a misspelt key and bad settings (status 2), the same run again without --resume
    and a resume with another batch (status 1): none of them changes a byte of the run."""
    trainer = TRAINERS[name]
    data = write_jsonl(tmp_path / "train.jsonl", trainer.rows)
    out = tmp_path / "run"

    def main(*flags, data=data, model=model_dir):
        return trainer.module.main(cli_args(model, data, out, "--max-steps", 2, *flags,
                                            device="cpu", **trainer.settings))

    assert main(*trainer.run_flags) == 0
    before = snapshot(out)
    assert set(trainer.run_files) <= set(before)
    capsys.readouterr()

    bad = write_jsonl(tmp_path / "bad.jsonl", trainer.bad_rows)
    assert main(data=bad) == 1
    assert f"{bad}:2:{trainer.bad_message}" in capsys.readouterr().err
    assert main(model=tmp_path / "no-such-model") == 1
    err = capsys.readouterr().err
    assert "--model" in err and "no-such-model" in err

    toml = tmp_path / "bad.toml"
    toml.write_text('lr = 0.001\nbatch_sise = 4\n')
    for flags, message in ((("--config", toml), "unknown key 'batch_sise'"),
                           *SHARED_BAD_SETTINGS, *trainer.bad_settings):
        with pytest.raises(SystemExit) as exit_info:
            main(*flags)
        assert exit_info.value.code == 2, flags
        assert message in capsys.readouterr().err, flags

    assert main() == 1
    assert "already holds" in capsys.readouterr().err
    assert main(*trainer.run_flags, "--batch-size", 8, "--resume", "latest") == 1
    assert (f"--batch-size x --grad-accum = 4 {trainer.unit} per step, this one 8"
            in capsys.readouterr().err)
    assert snapshot(out) == before


@pytest.mark.parametrize("name", TRAINERS)
def test_nan_loss_stops_with_the_step_named(name, model_dir, tmp_path, monkeypatch, capsys):
    """NaN from step 3 on: the run stops there with status 1 and the step named, having
    saved and logged nothing of step 3; resuming from step 2 meets the NaN again."""
    trainer = TRAINERS[name]
    data = write_jsonl(tmp_path / "train.jsonl", trainer.rows)
    out = tmp_path / "run"
    args = cli_args(model_dir, data, out, "--batch-size", 8, "--max-steps", 6, "--save-every",
                    2, device="cpu", **trainer.settings)
    function, call = trainer.poison
    patch_from_call(monkeypatch, trainer.module, function, call, float("nan"))
    assert trainer.module.main(args) == 1
    assert "at step 3" in capsys.readouterr().err
    assert find_latest(out).name == "step-2"
    assert not (out / "checkpoints" / "step-3").exists() and not (out / "model").exists()
    assert max(r["step"] for r in read_metrics(out)) == 2
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.module.train(config_from_args(trainer.config, [*args, "--resume", "latest"]))


@pytest.mark.parametrize("name", TRAINERS)
def test_qlora_trains_adapters_over_a_4bit_base(name, model_dir, tmp_path, capsys):
    """--qlora --lora-r 4: the targeted linears are NF4 during the run (the model line says
    so), only adapters train, and the run ends with a PEFT adapter folder."""
    trainer = TRAINERS[name]
    data = write_jsonl(tmp_path / "train.jsonl", trainer.rows)
    out = tmp_path / "run"
    args = cli_args(model_dir, data, out, "--max-steps", 2, "--lora-r", 4, "--qlora",
                    *trainer.run_flags, device="cpu", **trainer.settings)
    assert trainer.module.main(args) == 0
    logged = "".join(capsys.readouterr())
    assert "QLoRA: LoRA on" in logged and "NF4 layers" in logged
    assert (out / common.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert read_metrics(out)[-1]["step"] == 2
