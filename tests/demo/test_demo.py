"""``kernelrl demo`` (kernelrl.demo.pipeline): the whole pipeline at the reduced CI size.

What is checked and why:
  * the default stages (sft, rm, ppo, dpo, best_of_n) run end to end with --size small
    --seed 0 on the CPU, each as its trainer in its own run folder (model/, curves.png,
    metrics.jsonl), one summary line per stage and the table printed;
  * summary.json has exactly the documented keys, every value a finite number, and the
    values that hold by definition (SFT's win rate 0.5 and KL 0, best-of-N's KL bound);
  * the demo's claim: PPO and DPO beat SFT on the gold score by at least MARGINS["small"];
  * --algos sft,rm,grpo runs GRPO instead of PPO/DPO (and it improves on SFT);
  * --qlora: the stages after SFT train adapters over the 4-bit SFT model, and PPO and DPO
    still beat SFT by QLORA_MARGINS["small"];
  * the errors: unknown, duplicated or impossible --algos (exit 2, message naming the
    stage and what it needs), a --out holding a previous demo (exit 1 unless
    --overwrite, which replaces it), a --out holding anything else;
  * the evaluation sampler: forbidden tokens are never sampled, and a row's response
    depends only on its seed.

Time: the two small pipelines take about 30 s and 15 s on 2 shared CPU cores (the whole
file about a minute); nothing here is marked slow, it runs in CI.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from kernelrl.demo.pipeline import (BEST_OF, MARGINS, MARKER, QLORA_MARGINS, DemoError, main,
                                    parse_algos,
                                    sample)
from kernelrl.demo.task import VOCAB, build_tokenizer, model_config

SMALL = ["--size", "small", "--device", "cpu", "--seed", "0"]
POLICY_KEYS = {"gold_score", "win_rate_vs_sft", "kl_to_sft"}


def run_demo(*args: str) -> tuple[int, str]:
    """main(args): (exit status, what it printed on stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> tuple[Path, str, dict]:
    """The default stages at --size small, seed 0: (out folder, stdout, summary)."""
    out = tmp_path_factory.mktemp("demo") / "small"
    code, printed = run_demo(*SMALL, "--out", str(out))
    assert code == 0, printed
    return out, printed, json.loads((out / "summary.json").read_text())


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


# ---- the default pipeline, small --------------------------------------------------------

def test_every_stage_runs_as_its_trainer(small_demo):
    out, printed, _ = small_demo
    assert (out / MARKER).is_file()
    assert (out / "init" / "config.json").is_file()
    assert (out / "init" / "tokenizer.json").is_file()
    for stage in ("sft", "rm", "ppo", "dpo"):
        for name in ("config.toml", "metrics.jsonl", "curves.png", "model/config.json"):
            assert (out / stage / name).is_file(), f"{stage}/{name}"
        assert f"\n{stage}: " in "\n" + printed          # its one-line summary
    assert not (out / "grpo").exists()
    assert (out / "summary.png").stat().st_size > 0
    assert "gold score" in printed and "win rate vs SFT" in printed
    assert "held-out pair accuracy" in printed


def test_summary_schema(small_demo):
    _, _, summary = small_demo
    assert set(summary) == {"sft", "best_of_n", "ppo", "dpo", "reward_model"}
    for name in ("sft", "best_of_n", "ppo", "dpo"):
        assert set(summary[name]) == POLICY_KEYS, name
    assert set(summary["reward_model"]) == {"heldout_accuracy"}
    for name, row in summary.items():
        for key, value in row.items():
            assert is_number(value), f"{name}.{key} = {value!r}"
    assert summary["sft"]["win_rate_vs_sft"] == 0.5
    assert summary["sft"]["kl_to_sft"] == 0.0
    assert summary["best_of_n"]["kl_to_sft"] == pytest.approx(
        math.log(BEST_OF) - (BEST_OF - 1) / BEST_OF)
    assert 0.75 < summary["reward_model"]["heldout_accuracy"] <= 1
    for name in ("ppo", "dpo"):
        assert summary[name]["kl_to_sft"] > 0
        assert 0.5 < summary[name]["win_rate_vs_sft"] <= 1


def test_ppo_and_dpo_beat_sft_by_the_stated_margin(small_demo):
    _, printed, summary = small_demo
    sft = summary["sft"]["gold_score"]
    for name in ("ppo", "dpo"):
        gain = summary[name]["gold_score"] - sft
        assert gain >= MARGINS["small"], f"{name}: {gain:+.2f} over SFT"
        assert f"{name} beats SFT on the gold score by {gain:+.2f}: yes" in printed
    assert summary["best_of_n"]["gold_score"] > sft


def test_qlora_pipeline_still_beats_sft(tmp_path):
    """--qlora: the reward model, PPO and DPO are adapters over the SFT model in NF4 (the
    adapter folders record the 4-bit base, and the evaluation loads them over it), and PPO
    and DPO still beat SFT by the stated margin."""
    out = tmp_path / "q"
    code, printed = run_demo(*SMALL, "--qlora", "--algos", "sft,rm,ppo,dpo", "--out", str(out))
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    for stage in ("rm", "ppo", "dpo"):
        record = json.loads((out / stage / "adapter" / "kernelrl_nf4.json").read_text())
        assert record["blocksize"] == 64 and record["modules"], stage
        assert "qlora = true" in (out / stage / "config.toml").read_text(), stage
    assert (out / "sft" / "model" / "config.json").is_file()       # SFT: every weight
    for name in ("ppo", "dpo"):
        gain = summary[name]["gold_score"] - summary["sft"]["gold_score"]
        assert gain >= QLORA_MARGINS["small"], f"{name}: {gain:+.2f} over SFT"
        assert f"beats SFT on the gold score by {gain:+.2f}: yes" in printed


def test_grpo_instead_of_ppo_and_dpo(tmp_path):
    code, printed = run_demo(*SMALL, "--algos", "sft,rm,grpo", "--out", str(tmp_path / "g"))
    assert code == 0, printed
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert set(summary) == {"sft", "grpo", "reward_model"}
    assert set(summary["grpo"]) == POLICY_KEYS
    assert all(is_number(v) for row in summary.values() for v in row.values())
    assert summary["grpo"]["gold_score"] > summary["sft"]["gold_score"]
    assert (tmp_path / "g" / "grpo" / "curves.png").is_file()
    assert not (tmp_path / "g" / "ppo").exists() and not (tmp_path / "g" / "dpo").exists()
    assert "\ngrpo: " in printed


# ---- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("algos,message", [
    ("sft,ppo", "ppo needs rm (it uses the reward model); add rm"),
    ("rm", "rm needs sft (it starts from the SFT policy); add sft"),
    ("dpo,best_of_n", "dpo needs sft"),
    ("sft,rm,reinforce", "unknown stage 'reinforce'"),
    ("sft,sft", "given twice"),
    (" , ", "expected comma-separated stages"),
])
def test_impossible_algos(algos, message, tmp_path, capsys):
    with pytest.raises(DemoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_algos(algos)
    with pytest.raises(SystemExit) as exit_info:
        main(["--algos", algos, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_algos_run_in_pipeline_order():
    assert parse_algos("best_of_n,dpo,rm,sft") == ["sft", "rm", "dpo", "best_of_n"]
    assert parse_algos("sft,rm,grpo") == ["sft", "rm", "grpo"]


def test_bad_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "huge"])
    assert exit_info.value.code == 2
    assert "--size" in capsys.readouterr().err


def test_existing_demo_needs_overwrite(small_demo, capsys):
    out, _, _ = small_demo
    before = (out / "summary.json").read_text()
    assert main([*SMALL, "--out", str(out), "--algos", "sft"]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "holds a previous demo" in err and "--overwrite" in err
    assert (out / "summary.json").read_text() == before        # untouched


def test_out_that_is_not_a_demo_is_refused(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for args in (["--out", str(tmp_path / "mine")],
                 ["--out", str(tmp_path / "mine"), "--overwrite"]):
        assert main(args) == 1
        assert "holds no previous demo" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["--out", str(tmp_path / "mine" / "notes.txt")]) == 1
    assert "is a file" in capsys.readouterr().err


def test_overwrite_replaces_a_previous_demo(tmp_path):
    out = tmp_path / "old"
    (out / "dpo" / "model").mkdir(parents=True)                 # an earlier run's stages
    (out / MARKER).write_text("# DemoConfig\n")
    (out / "summary.json").write_text("{}")
    code, printed = run_demo(*SMALL, "--algos", "sft", "--out", str(out), "--overwrite")
    assert code == 0, printed
    assert not (out / "dpo").exists()
    assert set(json.loads((out / "summary.json").read_text())) == {"sft"}


# ---- the evaluation sampler ----------------------------------------------------------------

def test_sampler_masks_forbidden_tokens_and_is_seeded_per_row():
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config("small")).eval()
    tokenizer = build_tokenizer()
    allowed = {VOCAB["fluffy"], VOCAB["paws"], tokenizer.eos_token_id}
    forbidden = [i for i in VOCAB.values() if i not in allowed]
    prompt = tokenizer("describe cats :")["input_ids"]
    other = tokenizer("tell me about rain :")["input_ids"]
    kwargs = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                  forbidden=forbidden)
    rollout = sample(model, [prompt, other, prompt], [1, 2, 1], **kwargs)
    for response in rollout.responses():
        assert set(response) <= allowed
    texts = rollout.texts(tokenizer)
    assert texts[0] == texts[2]                                  # same seed, same prompt
    alone = sample(model, [prompt], [1], **kwargs).texts(tokenizer)
    assert alone == texts[:1]                                    # independent of the batch
