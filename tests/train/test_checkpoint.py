"""kernelrl.train.checkpoint: bitwise resume, RNG, crash safety, pruning, the out guard,
and that nothing is ever pickled."""

import json
import pickle
import random

import numpy as np
import pytest
import torch

from kernelrl.train import checkpoint as ckpt_mod
from kernelrl.train.checkpoint import (
    CheckpointError, apply_checkpoint, capture_rng_state, find_latest, list_checkpoints,
    load_checkpoint, prepare_run_dir, restore_rng_state, save_checkpoint, save_due)


def _make(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randn(8, 5)                # drawn from the global RNG: resume must restore it
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _assert_same(a, b):
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


def test_adamw_lambdalr_resume_is_bitwise(tmp_path):
    ref = _make(0)
    _train(*ref, 6)

    model, opt, sched = _make(0)
    _train(model, opt, sched, 3)
    save_checkpoint(tmp_path, 3, model_state=model.state_dict(), optimizer=opt,
                    scheduler=sched, data_state={"epoch": 0, "index": 24})

    model2, opt2, sched2 = _make(123)           # fresh objects, other weights
    torch.manual_seed(999)                      # and another RNG position
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and ck.data == {"epoch": 0, "index": 24}
    apply_checkpoint(ck, model2, opt2, sched2, rng=True)

    saved = opt.state_dict()
    restored = opt2.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            other = restored["state"][index][key]
            assert other.dtype == value.dtype and torch.equal(other, value), (index, key)
    assert sched2.state_dict() == sched.state_dict()

    _train(model2, opt2, sched2, 3)
    _assert_same(model2, ref[0])
    for a, b in zip(ref[1].state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert sched2.get_last_lr() == ref[2].get_last_lr()


def test_optimizer_json_keeps_step_as_a_number(tmp_path):
    model, opt, sched = _make(0)
    _train(model, opt, sched, 2)
    path = save_checkpoint(tmp_path, 2, model_state=dict(model.named_parameters()),
                           optimizer=opt, scheduler=sched)
    text = (path / "optimizer.json").read_text()
    assert '"__scalar__": 2.0' in text and '"dtype": "float32"' in text
    assert json.loads((path / "scheduler.json").read_text())["last_epoch"] == 2


def test_rng_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(3), torch.rand(4))
    random.random(), np.random.rand(7), torch.rand(9)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(3), torch.rand(4))
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_rng_round_trip_through_files(tmp_path):
    save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(2)})
    expected = (random.random(), np.random.randn(3), torch.randn(4))
    ck = load_checkpoint(tmp_path / "checkpoints" / "step-1")
    restore_rng_state(ck.rng)
    assert random.random() == expected[0]
    assert np.array_equal(np.random.randn(3), expected[1])
    assert torch.equal(torch.randn(4), expected[2])


def test_model_state_extra_and_adapters(tmp_path):
    base = torch.nn.Linear(4, 4)
    adapters = {"lora_A": torch.randn(2, 4), "lora_B": torch.zeros(4, 2, dtype=torch.bfloat16)}
    extra = {"kl_ctl": {"value": 0.05, "horizon": 10000}, "pairs": (1, 2)}
    save_checkpoint(tmp_path, 7, model_state=adapters, extra=extra, rng=False)
    ck = load_checkpoint(tmp_path)
    assert ck.extra == extra and ck.rng is None and ck.optimizer is None
    target = {k: torch.empty_like(v) for k, v in adapters.items()}
    apply_checkpoint(ck, target)
    assert all(torch.equal(target[k], adapters[k]) for k in adapters)
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        apply_checkpoint(ck, base)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        apply_checkpoint(ck, optimizer=torch.optim.AdamW(base.parameters()))


def test_tied_weights_and_bad_values(tmp_path):
    w = torch.randn(3, 3)
    save_checkpoint(tmp_path, 1, model_state={"embed": w, "lm_head": w})
    ck = load_checkpoint(tmp_path)
    assert torch.equal(ck.model["embed"], ck.model["lm_head"])
    with pytest.raises(CheckpointError, match="extra.when is of type object"):
        save_checkpoint(tmp_path, 2, model_state={"w": w}, extra={"when": object()})
    assert find_latest(tmp_path).name == "step-1"
    with pytest.raises(CheckpointError, match="entry 'x' is int"):
        save_checkpoint(tmp_path, 2, model_state={"x": 1})


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(3)}, data_state={"i": 1})
    marker = (tmp_path / "checkpoints" / "latest.json").read_text()
    calls = {"n": 0}
    real = ckpt_mod.save_file

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:                     # the model file is written, then the disk "fails"
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", failing)
    model, opt, _ = _make(0)
    _train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model_state={"w": torch.full((3,), 2.0)}, optimizer=opt)
    monkeypatch.setattr(ckpt_mod, "save_file", real)

    folder = tmp_path / "checkpoints"
    assert (folder / "latest.json").read_text() == marker
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-1"]
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1 and torch.equal(ck.model["w"], torch.ones(3)) and ck.data == {"i": 1}


def test_killed_save_leaves_scratch_that_is_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(1)})
    folder = tmp_path / "checkpoints"
    scratch = folder / ".tmp-step-2-abc"         # what a SIGKILL mid-save leaves
    scratch.mkdir()
    (scratch / "model.safetensors").write_bytes(b"partial")
    assert find_latest(tmp_path).name == "step-1"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    save_checkpoint(tmp_path, 2, model_state={"w": torch.ones(1)})
    assert not scratch.exists()
    # a marker lost or pointing nowhere: the scan still finds the newest complete one
    (folder / "latest.json").write_text('{"dir": "step-9"}')
    assert find_latest(tmp_path).name == "step-2"
    (folder / "latest.json").unlink()
    assert find_latest(tmp_path).name == "step-2"


def test_keep_last_n(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model_state={"w": torch.tensor([float(step)])})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text()) == {
        "dir": "step-40", "step": 40}

    other = tmp_path / "all"
    for step in (1, 2, 3):
        save_checkpoint(other, step, model_state={"w": torch.zeros(1)}, keep=None)
    assert [s for s, _ in list_checkpoints(other)] == [1, 2, 3]
    with pytest.raises(CheckpointError, match="keep must be"):
        save_checkpoint(other, 4, model_state={"w": torch.zeros(1)}, keep=0)


def test_resume_from_earlier_step_drops_later_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model_state={"w": torch.zeros(1)}, keep=None)
    start = prepare_run_dir(tmp_path, tmp_path / "checkpoints" / "step-2")
    assert start.name == "step-2"
    save_checkpoint(tmp_path, 2, model_state={"w": torch.ones(1)}, keep=None)  # same step again
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert torch.equal(load_checkpoint(tmp_path).model["w"], torch.ones(1))


def test_save_due():
    assert [s for s in range(1, 11) if save_due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if save_due(s, None, 10)] == [10]


def test_out_dir_guard(tmp_path):
    out = tmp_path / "run"
    assert prepare_run_dir(out, None) is None and out.is_dir()
    assert prepare_run_dir(out, False) is None            # no checkpoints yet: fine
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        prepare_run_dir(out, True)
    save_checkpoint(out, 5, model_state={"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"already holds a run's checkpoints \(latest: "
                                              r"step-5\); pass --resume"):
        prepare_run_dir(out, None)
    assert prepare_run_dir(out, True).name == "step-5"
    assert prepare_run_dir(out, out).name == "step-5"
    assert prepare_run_dir(tmp_path / "new", out).name == "step-5"   # continue elsewhere

    other = tmp_path / "other"
    save_checkpoint(other, 1, model_state={"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="is not one of them"):
        prepare_run_dir(out, other)
    with pytest.raises(CheckpointError, match="no complete checkpoint there"):
        prepare_run_dir(out, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no complete checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


def test_nothing_is_pickled(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in ((pickle, "dump"), (pickle, "dumps"), (pickle, "load"),
                         (pickle, "loads"), (torch, "save"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)

    model, opt, sched = _make(0)
    _train(model, opt, sched, 2)
    save_checkpoint(tmp_path, 2, model_state=model.state_dict(), optimizer=opt,
                    scheduler=sched, data_state={"i": 3}, extra={"t": torch.arange(3)})
    ck = load_checkpoint(tmp_path)
    assert torch.equal(ck.extra["t"], torch.arange(3))

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix in (".json", ".safetensors"), path
        head = path.read_bytes()[:16]
        assert not head.startswith(b"PK\x03\x04"), path            # torch.save's zip
        if path.suffix == ".json":
            json.loads(path.read_text())
            assert not head.startswith(b"\x80"), path               # pickle protocol >= 2
        else:
            header_len = int.from_bytes(head[:8], "little")
            assert json.loads(path.read_bytes()[8:8 + header_len])  # a safetensors header
