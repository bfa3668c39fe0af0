"""kernelrl.train.sample: best-of-N sampling on a tiny random Llama (CPU, fp32).

Best-of-1 is plain sampling with the same seed; a larger N never lowers a prompt's score
(candidate 0 is the best-of-1 sample) and keeps the first of the highest-scoring
candidates; the results do not depend on --batch-size; the output file's schema, its
atomic writing and the refusal to overwrite; a LoRA adapter export or a run folder as
--policy; a reward model as the reward; the settings' errors.
"""

import json

import pytest
import torch

import train_helpers
from rl_helpers import marker_reward, prompt_rows, write_module
from train_helpers import NUMBERS, SPECIALS, VOCAB, make_tokenizer, snapshot, write_jsonl
from kernelrl.models.hf import load_model
from kernelrl.train import common, rl, sample
from kernelrl.train.rollout import generate

one_thread = train_helpers.one_thread     # the shared fixtures, in use in this module
model_dir = train_helpers.model_dir

NEW_TOKENS = 8
PROMPTS = [r["prompt"] for r in prompt_rows(6, seed=1)]


def number_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The number words in a response: a rule with some spread over random completions."""
    return [float(sum(w in NUMBERS for w in r.split())) for r in responses]


def constant_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Every candidate ties."""
    return [1.0] * len(responses)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir).eval()


@pytest.fixture(scope="module")
def sampling():
    return sample.make_sampling(make_tokenizer(), max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sample") / "prompts.jsonl",
                       [{"prompt": p} for p in PROMPTS])


def _best(model, sampling, n, reward_fn=None, **options):
    tok = make_tokenizer()
    reward = rl.RewardFunction(reward_fn, tok) if reward_fn is not None else None
    return sample.best_of_n(model, tok, PROMPTS, n=n, reward=reward, sampling=sampling,
                            **({"seed": 3, "batch_size": 4} | options))


def _args(policy, prompts, out, *extra):
    return ["--policy", str(policy), "--prompts", str(prompts), "--out", str(out),
            "--device", "cpu", "--max-new-tokens", str(NEW_TOKENS), "--seed", "3",
            *map(str, extra)]


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------


def test_best_of_1_is_plain_sampling_with_the_same_seed(model, sampling):
    plain = _best(model, sampling, 1, batch_size=6)
    scored = _best(model, sampling, 1, number_reward, batch_size=6)
    # By hand: one generate call, prompt i drawn from generator sample_seed(3, i, 0), the
    # tokenizer's special tokens but EOS banned (--bad-token-ids' default, special).
    tok = make_tokenizer()
    data = rl.tokenize_prompts([("", p) for p in PROMPTS], tok, max_prompt_length=100)
    specials = [VOCAB[t] for t in SPECIALS if t != "</s>"]
    assert sampling.bad_token_ids == tuple(sorted(specials))

    def by_hand(banned):
        generators = [torch.Generator().manual_seed(sample.sample_seed(3, i, 0))
                      for i in range(len(PROMPTS))]
        with torch.no_grad():
            return generate(model, [s.ids for s in data.samples], generator=generators,
                            max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, bad_token_ids=banned)

    rollout = by_hand(specials)
    assert not {t for row in rollout.responses() for t in row} & set(specials)
    texts = rollout.texts(tok)
    assert [r["completion"] for r in plain] == [r["completion"] for r in scored] == texts
    # without the ban, this random model does emit special tokens (decoding hides them)
    free = by_hand(None)
    assert {t for row in free.responses() for t in row} & set(specials)
    assert free.texts(tok) != texts
    assert len(set(texts)) > 1                                  # really sampled
    assert all(r["score"] is None and r["scores"] is None for r in plain)
    assert [r["score"] for r in scored] == number_reward(PROMPTS, texts)
    assert [r["scores"] for r in scored] == [[s] for s in number_reward(PROMPTS, texts)]
    assert [r["prompt"] for r in plain] == PROMPTS


def test_a_larger_n_does_not_lower_the_score(model, sampling):
    one = _best(model, sampling, 1, number_reward)
    four = _best(model, sampling, 4, number_reward)
    for a, b in zip(one, four):
        assert len(b["scores"]) == 4 and b["score"] == max(b["scores"])
        assert b["score"] == number_reward([b["prompt"]], [b["completion"]])[0]
        assert b["scores"][0] == a["score"]          # candidate 0 is the best-of-1 sample
        assert b["score"] >= a["score"]
    mean = [sum(r["score"] for r in rs) / len(rs) for rs in (one, four)]
    assert mean[1] >= mean[0]
    assert mean[1] > mean[0], "selection should pick a better candidate somewhere"


def test_ties_keep_the_first_candidate(model, sampling):
    one = _best(model, sampling, 1)
    four = _best(model, sampling, 4, constant_reward)
    assert [r["completion"] for r in four] == [r["completion"] for r in one]
    assert all(r["scores"] == [1.0] * 4 for r in four)


def test_the_batch_size_does_not_change_the_samples(model, sampling):
    assert _best(model, sampling, 3, number_reward, batch_size=1) == \
        _best(model, sampling, 3, number_reward, batch_size=5)


def test_best_of_n_checks_its_arguments(model, sampling):
    with pytest.raises(ValueError, match="reward: best-of-n with n=2"):
        _best(model, sampling, 2)
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        _best(model, sampling, 0, number_reward)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        _best(model, sampling, 1, batch_size=0)


# ----------------------------------------------------------------------------------------
# The command line


def test_the_output_schema(model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "best.jsonl"
    args = _args(model_dir, prompts_file, out, "--best-of", 3, "--batch-size", 4,
                 "--reward-fn", "rl_helpers:marker_reward")
    assert sample.main(args) == 0
    lines = _lines(out)
    assert [list(r) for r in lines] == [["prompt", "completion", "score", "scores"]] * 6
    assert [r["prompt"] for r in lines] == PROMPTS
    for r in lines:
        assert isinstance(r["completion"], str) and len(r["scores"]) == 3
        assert r["score"] == max(r["scores"])
        assert r["score"] == marker_reward([r["prompt"]], [r["completion"]])[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.jsonl"]   # no temp left
    assert "wrote 6 completions" in capsys.readouterr().err

    plain = tmp_path / "plain.jsonl"                    # no --best-of, no reward
    assert sample.main(_args(model_dir, prompts_file, plain, "--batch-size", 4)) == 0
    rows = _lines(plain)
    assert [list(r) for r in rows] == [["prompt", "completion", "score"]] * 6
    assert all(r["score"] is None for r in rows)
    # The same seed: the plain samples are candidate 0 of best-of-3.
    assert [r["scores"][0] for r in lines] == \
        marker_reward(PROMPTS, [r["completion"] for r in rows])


def test_an_existing_out_is_left_alone(model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    before = snapshot(tmp_path)
    assert sample.main(_args(model_dir, prompts_file, out)) == 1
    err = capsys.readouterr().err
    assert "--out:" in err and "exists; pass --overwrite" in err
    assert snapshot(tmp_path) == before
    assert sample.main(_args(model_dir, prompts_file, out, "--overwrite")) == 0
    assert len(_lines(out)) == 6


def test_a_crash_leaves_no_file(model_dir, prompts_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_module(tmp_path, "sample_crash_reward", (
        "calls = []\n"
        "def score(prompts, responses):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        raise ValueError('the reward broke')\n"
        "    return [0.0] * len(responses)\n"))
    out = tmp_path / "out" / "best.jsonl"
    args = _args(model_dir, prompts_file, out, "--best-of", 2, "--batch-size", 2,
                 "--reward-fn", "sample_crash_reward:score")
    assert sample.main(args) == 1
    assert "the reward broke" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []            # no output, no temp file


@pytest.mark.parametrize("flags, message", [
    (("--best-of", 4), "--best-of 4: ranks the samples by a reward; give --reward-model or "
                       "--reward-fn"),
    (("--reward-fn", "rl_helpers:marker_reward", "--reward-model", "rm"),
     "--reward-model / --reward-fn: give one or the other"),
    (("--reward-fn", "no_such_module_abc:f"), "--reward-fn: cannot import module"),
    (("--best-of", 0, "--reward-fn", "rl_helpers:marker_reward"),
     "--best-of: expected an int >= 1 or none"),
    (("--temperature", -1), "--temperature: expected a finite number >= 0"),
    (("--top-p", 0), "--top-p: expected a number in (0, 1]"),
    (("--batch-size", 0), "--batch-size: expected an int >= 1"),
    (("--bad-token-ids", "pad"), "--bad-token-ids: expected comma-separated token ids"),
    (("--bad-token-ids", "1,-2"), "--bad-token-ids: expected comma-separated token ids"),
])
def test_bad_settings_exit_2_naming_the_flag(model_dir, prompts_file, tmp_path, capsys,
                                             flags, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as info:
        sample.main(_args(model_dir, prompts_file, out, *flags))
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        sample.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--policy PATH", "--best-of INT", "--reward-model STR", "--reward-fn STR",
                 "--overwrite, --no-overwrite", "--max-prompt-length INT", "--top-k INT",
                 "--bad-token-ids STR"):
        assert flag.replace("PATH", "STR") in text, flag
    assert "'' or none: ban nothing (default: special)" in text


def test_bad_token_ids_through_the_cli(model_dir, model, prompts_file, tmp_path, capsys):
    tok = make_tokenizer()
    outs = {}
    for name, flags in (("default", ()), ("none", ("--bad-token-ids", "")),
                        ("more", ("--bad-token-ids", "special,4,5"))):
        outs[name] = tmp_path / f"{name}.jsonl"
        assert sample.main(_args(model_dir, prompts_file, outs[name], *flags)) == 0
        got = [r["completion"] for r in _lines(outs[name])]
        sampling = sample.make_sampling(tok, max_new_tokens=NEW_TOKENS,
                                        bad_token_ids=flags[1] if flags else "special")
        assert got == [r["completion"] for r in _best(model, sampling, 1, batch_size=8)]
        banned = {"none": (), "default": (0, 1, 2), "more": (0, 1, 2, 4, 5)}[name]
        assert sampling.bad_token_ids == banned
        assert not {w for text in got for w in text.split()} & \
            {t for t, i in VOCAB.items() if i in banned}
    assert _lines(outs["default"]) != _lines(outs["none"])
    # EOS cannot be banned; an id past the model's vocabulary is refused by generate
    for value, message in (
            ("special,3", "--bad-token-ids: 3 is the EOS token"),
            ("99", f"bad_token_ids: expected a token id in [0, {len(VOCAB)}), got 99")):
        out = tmp_path / "bad.jsonl"
        args = _args(model_dir, prompts_file, out, "--bad-token-ids", value)
        assert sample.main(args) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()


# ----------------------------------------------------------------------------------------
# Other policies and rewards


def test_a_lora_adapter_export_as_policy(model_dir, model, prompts_file, tmp_path, sampling):
    lora = common.setup_model(model_dir, lora_r=2, lora_alpha=4,
                              lora_targets="q_proj,v_proj").eval()
    with torch.no_grad():
        for name, p in common.trainable_state(lora).items():
            if "lora.B" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    assert any("lora.B" in name for name in common.trainable_state(lora))
    run_dir = tmp_path / "run"
    folder = common.export_model(lora, run_dir, tokenizer=make_tokenizer(),
                                 base_model=model_dir)
    assert folder == run_dir / common.ADAPTER_DIR
    outs = {}
    for name, policy in (("run", run_dir), ("adapter", folder)):
        outs[name] = tmp_path / f"{name}.jsonl"
        assert sample.main(_args(policy, prompts_file, outs[name], "--batch-size", 4)) == 0
    got = [r["completion"] for r in _lines(outs["run"])]
    assert got == [r["completion"] for r in _lines(outs["adapter"])]
    assert got == [r["completion"] for r in _best(lora, sampling, 1)]     # the adapter on
    assert got != [r["completion"] for r in _best(model, sampling, 1)]    # not the base

    loaded = sample.load_policy(run_dir)
    assert loaded.folder == folder and loaded.base == model_dir.resolve()
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_a_reward_model_ranks_and_is_no_policy(model_dir, prompts_file, tmp_path, capsys):
    from kernelrl.models.reward import RewardModel

    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    RewardModel.from_causal_lm(load_model(model_dir),
                               pad_token_id=make_tokenizer().pad_token_id).save_pretrained(
        rm_dir)
    make_tokenizer().save_pretrained(rm_dir)
    out = tmp_path / "best.jsonl"
    args = _args(model_dir, prompts_file, out, "--best-of", 3, "--reward-model", rm_dir)
    assert sample.main(args) == 0
    lines = _lines(out)
    assert len(lines) == 6 and all(r["score"] == max(r["scores"]) for r in lines)
    assert len({s for r in lines for s in r["scores"]}) > 3      # real, varied scores
    assert "reward: the reward model" in capsys.readouterr().err

    assert sample.main(_args(rm_dir, prompts_file, tmp_path / "x.jsonl")) == 1
    assert "is a reward model, not a causal LM" in capsys.readouterr().err
    assert sample.main(_args(tmp_path / "nowhere", prompts_file, tmp_path / "x.jsonl")) == 1
    assert "--policy: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
