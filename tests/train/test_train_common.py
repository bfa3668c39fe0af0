"""kernelrl.train.common: the LR schedule (hand-computed), AdamW groups, clipping, device
and seeding, model setup (full and LoRA), the run folder, checkpoint round trips, export."""

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train_helpers import VOCAB, write_model_folder
from kernelrl.models.hf import load_model
from kernelrl.train import common
from kernelrl.train.checkpoint import CheckpointError


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, busy machine two threads waiting on each other
    make tiny steps orders of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("tiny") / "model")


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
    from kernelrl.train.checkpoint import load_checkpoint
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
    from kernelrl.train.checkpoint import load_checkpoint
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
