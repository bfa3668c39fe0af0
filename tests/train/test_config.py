"""kernelrl.train.config: flags mirror the dataclass, TOML with flags on top, clear errors,
and save_config's TOML reads back to the same config."""

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from kernelrl.train.config import (
    ConfigError, add_dataclass_args, config_from_args, config_to_toml, load_config_file,
    save_config)


@dataclass
class Sample:
    """Train a sample model."""

    model: str = field(metadata={"help": "model name or folder"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate, 100% at warmup end"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    packing: bool = field(default=True, metadata={"help": "pack short examples"})
    keep: Optional[int] = field(default=2, metadata={"help": "checkpoints kept"})
    resume: Optional[str] = field(default=None, metadata={"help": "resume from"})
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    out: Path = Path("runs/sample")

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def _error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        config_from_args(Sample, argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_flags_mirror_fields_and_help(capsys):
    with pytest.raises(SystemExit):
        config_from_args(Sample, ["--help"], prog="kernelrl sample")
    text = " ".join(capsys.readouterr().out.split())
    assert "Train a sample model." in text
    assert "--lr FLOAT peak learning rate, 100% at warmup end (default: 2e-05)" in text
    assert "--max-steps INT optimizer steps (default: 100)" in text
    assert "--packing, --no-packing pack short examples (default: true)" in text
    assert "--keep INT checkpoints kept (default: 2; none unsets it)" in text
    assert "--resume STR resume from (default: none)" in text
    assert "--loss-type {sigmoid,ipo,hinge} (default: sigmoid)" in text
    assert "--model STR model name or folder (required)" in text
    assert "--config FILE.toml" in text


def test_parse_flags():
    cfg = config_from_args(Sample, ["--model", "m", "--lr", "1e-3", "--no-packing",
                                    "--keep", "none", "--loss-type", "ipo", "--out", "x/y"])
    assert cfg == Sample(model="m", lr=1e-3, packing=False, keep=None, loss_type="ipo",
                         out=Path("x/y"))
    assert isinstance(cfg.lr, float) and isinstance(cfg.out, Path)
    assert config_from_args(Sample, ["--model", "m"]) == Sample(model="m")


def test_flag_errors_name_the_flag(capsys):
    assert "argument --max-steps: expected an integer, got '1.5'" in _error(
        capsys, ["--model", "m", "--max-steps", "1.5"])
    assert "argument --loss-type: expected one of sigmoid, ipo, hinge, got 'dpo'" in _error(
        capsys, ["--model", "m", "--loss-type", "dpo"])
    assert "missing required settings: --model (or model in --config)" in _error(capsys, [])
    assert "max_steps must be >= 1, got 0" in _error(capsys, ["--model", "m", "--max-steps", "0"])


def test_toml_file_with_flags_overriding(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "tiny"\nlr = 1\nmax_steps = 7\npacking = false\n'
                    'loss_type = "hinge"\nkeep = "none"\n')
    cfg = config_from_args(Sample, ["--config", str(path), "--max-steps", "9"])
    assert cfg == Sample(model="tiny", lr=1.0, max_steps=9, packing=False, keep=None,
                         loss_type="hinge")
    assert isinstance(cfg.lr, float)
    # a flag equal to the default still overrides the file: it was given explicitly
    cfg = config_from_args(Sample, ["--config", str(path), "--max-steps", "100", "--packing"])
    assert cfg.max_steps == 100 and cfg.packing is True


def test_toml_errors(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('model = "m"\nlearning_rate = 0.1\n')
    err = _error(capsys, ["--config", str(path)])
    assert f"config file {path}: unknown key 'learning_rate'" in err
    assert "valid fields of Sample are: model, lr, max_steps, packing, keep, resume" in err

    path.write_text('max-steps = 3\n')
    with pytest.raises(ConfigError, match="unknown key 'max-steps' \\(did you mean 'max_steps'"):
        load_config_file(Sample, path)
    path.write_text('max_steps = "ten"\n')
    with pytest.raises(ConfigError, match=f"config file {path}: field 'max_steps' expects an "
                                          f"integer, got str 'ten'"):
        load_config_file(Sample, path)
    path.write_text('packing = 1\n')
    with pytest.raises(ConfigError, match="field 'packing' expects true or false, got int 1"):
        load_config_file(Sample, path)
    path.write_text('loss_type = "dpo"\n')
    with pytest.raises(ConfigError, match="'loss_type' expects one of sigmoid, ipo, hinge"):
        load_config_file(Sample, path)
    path.write_text('[train]\nlr = 1.0\n')
    with pytest.raises(ConfigError, match="'train' is a table"):
        load_config_file(Sample, path)
    path.write_text('lr = = 1\n')
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config_file(Sample, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(Sample, tmp_path / "missing.toml")


def test_save_config_round_trip(tmp_path):
    cfg = Sample(model='we"ird\\name\tx\u00e9\x7f', lr=1e-5, keep=None, resume="runs/a",
                 packing=False, out=Path("o"))
    path = save_config(cfg, tmp_path / "sub" / "config.toml")
    text = path.read_text()
    assert "lr = 1e-05" in text and 'keep = "none"' in text
    assert "# resume is unset" not in text and "# out" not in text
    assert config_from_args(Sample, ["--config", str(path)]) == cfg
    assert config_from_args(Sample, ["--config", str(path), "--keep", "3"]).keep == 3


def test_toml_floats():
    @dataclass
    class Floats:
        a: float = 5.0
        b: float = math.inf
        c: float = -math.inf
        d: float = 1e300

    text = config_to_toml(Floats())
    assert "a = 5.0\nb = inf\nc = -inf\nd = 1e+300\n" in text


def test_unsupported_field_type_is_refused():
    @dataclass
    class Bad:
        layers: list = field(default_factory=list)

    with pytest.raises(TypeError, match="Bad.layers: type <class 'list'> is not supported"):
        add_dataclass_args(argparse.ArgumentParser(), Bad)


def test_none_default_is_left_out(tmp_path):
    text = config_to_toml(Sample(model="m"))
    assert "# resume is unset (none)" in text and "keep = 2" in text
    assert load_config_file(Sample, save_config(Sample(model="m"), tmp_path / "c.toml")) == {
        "model": "m", "lr": 2e-5, "max_steps": 100, "packing": True, "keep": 2,
        "loss_type": "sigmoid", "out": Path("runs/sample")}
