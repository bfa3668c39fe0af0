"""The command line: `kernelrl` / `python -m kernelrl` info, tune, bench, --version, help."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernelrl import cli
from kernelrl._version import __version__


def kernelrl(*args, env=None, check=True):
    return subprocess.run([sys.executable, "-m", "kernelrl", *args], capture_output=True,
                          text=True, timeout=120, check=check, env=env)


def test_info_json():
    report = json.loads(kernelrl("info", "--json").stdout)
    assert set(report["ops"]) >= {"token_logprobs", "linear_logprobs"}
    assert report["ops"]["token_logprobs"]["cpu"]["choices"]["float32"]["backend"] in (
        "native", "torch")


def test_info_text_with_a_bogus_forced_backend_does_not_crash():
    env = dict(os.environ, KERNELRL_BACKEND="bogus")
    res = kernelrl("info", env=env, check=False)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "torch" in out and "triton" in out and "native" in out
    assert "token_logprobs" in out and "linear_logprobs" in out
    assert "KERNELRL_BACKEND='bogus' is invalid (valid: native, triton, torch" in out


def test_console_script_is_installed():
    beside = Path(sys.executable).with_name("kernelrl")      # the venv's bin/, off PATH
    exe = str(beside) if beside.exists() else shutil.which("kernelrl")
    if exe is None:
        pytest.skip("the `kernelrl` console script is not on PATH (package not pip-installed)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == f"kernelrl {__version__}"


def test_unknown_command_fails_with_usage():
    res = kernelrl("frobnicate", check=False)
    assert res.returncode == 2 and "usage: kernelrl" in res.stderr


def test_version_and_bare_command_print_without_torch():
    code = ("import sys, contextlib, io\n"
            "from kernelrl.cli import main\n"
            "for argv in (['--help'], ['tune', '--help'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit as exit:\n"
            "            assert exit.code == 0, (argv, exit.code)\n"
            "assert 'torch' not in sys.modules, 'kernelrl --help imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert kernelrl("--version").stdout.strip() == f"kernelrl {__version__}"
    bare = kernelrl()
    assert bare.returncode == 0 and bare.stdout.startswith("usage: kernelrl")
    assert all(name in bare.stdout for name in ("info", "tune", "bench"))


def test_every_flag_has_help_with_its_default():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and "default" in action.help, (name, action.dest)


def fake_benchmarks(tmp_path, code):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "run.py").write_text(code)
    return folder


def test_bench_forwards_its_arguments_verbatim_and_returns_the_exit_code(
        tmp_path, monkeypatch, capfd):
    record = tmp_path / "argv.json"
    folder = fake_benchmarks(tmp_path, "import json, sys\n"
                             f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                             "sys.exit(3)\n")
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: folder)
    args = ["logprobs", "--full", "--device", "cpu", "--cases", "token,linear", "--help"]
    assert cli.main(["bench", *args]) == 3
    assert json.loads(record.read_text()) == args


def test_bench_from_a_wheel_install_explains_where_the_suites_are(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "nowhere")
    assert cli.main(["bench", "--list"]) == 2
    err = capsys.readouterr().err
    assert "source repository's benchmarks/ folder" in err and "kernelrl bench --list" in err


def test_bench_folder_is_beside_the_package():
    assert cli.benchmarks_dir() == Path(cli.__file__).resolve().parents[1] / "benchmarks"


def test_trainer_subcommands_pass_their_arguments_through(capsys):
    """`kernelrl sft --help` is the trainer's own parser: one flag per config field."""
    from kernelrl import cli

    for name in cli.TRAINERS:
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: kernelrl {name}" in out
        if name not in ("sample", "demo"):                     # these train nothing themselves
            assert "--batch-size" in out and "--lora-r" in out
