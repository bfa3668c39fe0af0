"""kernelrl.train.rl and rl_update: the prompt reader (formatting as the data layer,
truncation, errors with file:line), reward functions from ``module:function`` and their
errors, reward models (on the policy's base, on their own, re-tokenised), the missing-EOS
penalty, experience collection (the update's log-probs equal the old ones bitwise:
importance ratio exactly 1, for LoRA and full fine-tuning), the settings GRPO and PPO
share (``settings.RLConfig``), the update phase against hand-computed mini-batches, the
KL controllers against hand-computed updates, and the checkpointed run state."""

import dataclasses
import math
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import train_helpers
from rl_helpers import length_reward, marker_reward, prompt_rows, write_module
from rm_helpers import ranked_examples
from train_helpers import (SPECIALS, VOCAB, WORDS, cli_args, help_text, make_tokenizer,
                           write_jsonl)
from kernelrl.models.lora import active_adapter, adapter_names, lora_modules
from kernelrl.ops import ppo_loss
from kernelrl.train import common, grpo, ppo, rl, rl_update, rm, settings
from kernelrl.train.batching import ResumableSampler
from kernelrl.train.data import PreferenceRecord, tokenize_preferences

one_thread = train_helpers.one_thread     # the shared fixtures, in use in this module
model_dir = train_helpers.model_dir


def _data_layer_prompt(tokenizer, text):
    """The prompt ids the RM/DPO data layer gives ``text``."""
    record = PreferenceRecord("x:1", text, [" one", " two"])
    return tokenize_preferences([record], tokenizer, max_length=10_000).samples[0].prompt_ids


def _chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}then "
                         "{% endif %}{{ m['content'] }} : {% endfor %}"
                         "{% if add_generation_prompt %}then {% endif %}")
    return tok


# ----------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_are_tokenised_as_the_data_layer_does(tmp_path, chat):
    tok = _chat_tokenizer() if chat else make_tokenizer()
    rows = prompt_rows(6, seed=1)
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    train, held_out = rl.load_prompts(data, tok, max_prompt_length=100)
    assert held_out is None and len(train) == 6
    for row, sample in zip(rows, train.samples):
        assert sample.ids == _data_layer_prompt(tok, row["prompt"])
        assert sample.text == row["prompt"]
    first = train.samples[0].ids
    assert (first[0] == VOCAB["<s>"]) != chat          # BOS: the plain format's only
    assert train.pad_token_id == VOCAB["<pad>"] and train.eos_token_id == VOCAB["</s>"]
    # plain: BOS, then the words
    if not chat:
        assert first == [VOCAB["<s>"]] + [VOCAB[w] for w in rows[0]["prompt"].split()]
    assert train.lengths() == [len(s.ids) for s in train.samples]


def test_prompt_truncation_keeps_the_end_and_bos(tmp_path):
    tok = make_tokenizer()
    words = "count from one to nine then a b c d :".split()
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": " ".join(words)}, {"prompt": "a b"}])
    train, _ = rl.load_prompts(data, tok, max_prompt_length=5)
    assert train.samples[0].ids == [VOCAB["<s>"]] + [VOCAB[w] for w in words[-4:]]
    assert train.samples[1].ids == [VOCAB["<s>"], VOCAB["a"], VOCAB["b"]]
    assert train.stats.as_dict() == {"examples": 2, "kept": 2, "truncated": 1,
                                     "dropped": 0, "pairs": 0, "pairs_dropped": 0}
    dropped, _ = rl.load_prompts(data, tok, max_prompt_length=5, overlong="drop")
    assert [s.text for s in dropped.samples] == ["a b"] and dropped.stats.dropped == 1
    with pytest.raises(ValueError, match="no train prompt left within --max-prompt-length 2"):
        rl.load_prompts(data, tok, max_prompt_length=2, overlong="drop")
    split, held_out = rl.load_prompts(data, tok, max_prompt_length=5, eval_fraction=0.5)
    assert len(split) == 1 and len(held_out) == 1


@pytest.mark.parametrize("line, message", [
    ('{"text": "a"}', ':2: missing "prompt"'),
    ('{"prompt": 3}', ':2: "prompt" must be a string, got number'),
    ('{"prompt": ["a"]}', ':2: "prompt" must be a string, got array'),
    ('{not json', ':2: not valid JSON'),
    ('[1]', ':2: expected a JSON object'),
])
def test_prompt_errors_name_file_and_line(tmp_path, line, message):
    data = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "a b"}', line])
    with pytest.raises(ValueError) as info:
        rl.load_prompts(data, make_tokenizer(), max_prompt_length=8)
    assert str(info.value).startswith(f"{data}{message}")


# ----------------------------------------------------------------------------------------
# Reward functions


def test_reward_fn_from_module_path(tmp_path, monkeypatch):
    write_module(tmp_path, "my_rewards", "def score(prompts, responses):\n"
                                         "    return [len(r) for r in responses]\n"
                                         "class Rules:\n"
                                         "    @staticmethod\n"
                                         "    def zero(prompts, responses):\n"
                                         "        return [0.0] * len(responses)\n"
                                         "VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rl.load_reward_fn("my_rewards:score")
    assert fn(["p"], ["abc"]) == [3]
    assert rl.load_reward_fn("my_rewards:Rules.zero")(["p"], ["x"]) == [0.0]
    for spec, message in (("my_rewards", "expected module:function"),
                          ("my_rewards:", "expected module:function"),
                          ("no_such_module_xyz:score", "cannot import module "
                                                      "'no_such_module_xyz'"),
                          ("my_rewards:nothing", "has no attribute 'nothing'"),
                          ("my_rewards:VALUE", "is a int, not a function")):
        with pytest.raises(ValueError, match="^--reward-fn: .*" + message):
            rl.load_reward_fn(spec)
    write_module(tmp_path, "broken_rewards", "raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="importing 'broken_rewards' raised RuntimeError: boom"):
        rl.load_reward_fn("broken_rewards:score")


def test_reward_fn_is_found_in_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "cwd"
    folder.mkdir()
    write_module(folder, "cwd_rewards_mod", "def f(p, r):\n    return [1.0] * len(r)\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])
    monkeypatch.chdir(folder)
    assert rl.load_reward_fn("cwd_rewards_mod:f")(["a"], ["b"]) == [1.0]


# ----------------------------------------------------------------------------------------
# Rollouts and experience


def _policy(model_dir, lora: bool, checkpointing: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = common.setup_model(model_dir, lora_r=4 if lora else 0, lora_alpha=8,
                               gradient_checkpointing=checkpointing)
    with torch.no_grad():            # LoRA starts at B = 0: make the adapters count
        for p in common.trainable_parameters(model):
            if lora:
                p.normal_(0, 0.2)
    return rl.disable_dropout(model)


def _samples(n=3, max_prompt_length=16):
    tok = make_tokenizer()
    records = [(f"p.jsonl:{i + 1}", r["prompt"]) for i, r in enumerate(prompt_rows(n, seed=4))]
    return tok, rl.tokenize_prompts(records, tok, max_prompt_length=max_prompt_length)


def _sampling(data, **changes):
    return rl.Sampling(**({"max_new_tokens": 6, "eos_token_id": data.eos_token_id,
                           "pad_token_id": data.pad_token_id, "temperature": 0.7} | changes))


@pytest.mark.parametrize("lora, checkpointing", [(True, False), (False, False), (True, True)])
def test_first_update_ratio_is_exactly_one(model_dir, lora, checkpointing):
    tok, data = _samples()
    model = _policy(model_dir, lora, checkpointing)
    reference, _ = rl.Reference.for_policy(model, common.TrainConfig(
        model=str(model_dir), data="-", out="-"), torch.device("cpu"))
    torch.manual_seed(1)
    exp = rl.collect_experience(model, data.samples, sampling=_sampling(data),
                                reward=rl.RewardFunction(marker_reward, tok), repeats=3,
                                reference=reference)
    assert model.training                               # the policy's mode is kept
    assert [s.text for s in exp.samples] == [s.text for s in data.samples for _ in range(3)]
    assert exp.rollout.batch_size == 9 and exp.logprobs.shape == exp.rollout.response_mask.shape

    logprobs, entropy = rl.policy_logprobs(model, exp.rollout, 0.7)      # as the update
    assert logprobs.requires_grad
    assert torch.equal(logprobs.detach(), exp.logprobs)                  # bitwise
    assert torch.equal(entropy.detach(), exp.entropy)
    advantages = torch.linspace(-1, 1, 9)
    loss, stats = ppo_loss(logprobs, exp.logprobs, advantages, exp.rollout.response_mask,
                           agg="seq-mean-token-mean")
    assert stats["ratio_mean"].item() == 1.0 and stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in common.trainable_parameters(model))

    # the sampler's log-probs (KV cache, temperature 0.7) agree with the old ones
    metrics, tokens = rl.rollout_metrics([exp])
    assert metrics["rollout/logprob_drift"] < 1e-4
    # a trainer's own statistics come back with the same sync, after the others
    more, _ = rl.rollout_metrics([exp], {"a": torch.tensor(2.5), "b": exp.scores.sum()})
    assert more == {**metrics, "a": 2.5, "b": pytest.approx(exp.scores.sum().item())}
    assert list(more)[-2:] == ["a", "b"]
    assert tokens == int(exp.rollout.attention_mask.sum())
    assert metrics["reward"] == pytest.approx(exp.rewards.mean().item())
    assert metrics["response_length"] == pytest.approx(exp.rollout.response_lengths.float()
                                                       .mean().item())
    # the reference is the initial model: adapters off, or a copy
    fresh = common.setup_model(model_dir)
    with torch.no_grad():
        expected = rl.policy_logprobs(fresh, exp.rollout, 0.7)[0]
    torch.testing.assert_close(exp.ref_logprobs, expected, rtol=0, atol=1e-5)
    kl = ((exp.logprobs - exp.ref_logprobs) * exp.rollout.response_mask).sum(-1)
    torch.testing.assert_close(exp.kl, kl)
    assert metrics["kl"] == pytest.approx(kl.mean().item(), abs=1e-6)


@pytest.mark.parametrize("lora", [True, False])
def test_first_update_ratio_is_exactly_one_with_banned_tokens(model_dir, lora):
    """A policy whose lm_head makes the tokenizer's special tokens the likeliest at every
    position: with them banned (``--bad-token-ids special``) none is sampled, and yet the
    update's log-probs equal the old ones bitwise (ratio exactly 1), both those of the
    whole, unbanned policy (the sampler's agree with them)."""
    tok, data = _samples()
    model = _policy(model_dir, lora)
    banned = rl.resolve_bad_token_ids("special", tok, eos_token_id=data.eos_token_id)
    assert banned == tuple(sorted(VOCAB[t] for t in SPECIALS if t != "</s>"))
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[list(banned)] = 10.0
    head.requires_grad_(not lora)
    model.lm_head = head

    def experience(sampling):
        torch.manual_seed(1)
        return rl.collect_experience(model, data.samples, sampling=sampling,
                                     reward=rl.RewardFunction(marker_reward, tok), repeats=3)

    free = experience(_sampling(data))
    said = [t for row in free.rollout.responses() for t in row]
    assert sum(t in banned for t in said) > len(said) / 2          # they dominate
    exp = experience(_sampling(data, bad_token_ids=banned))
    said = [t for row in exp.rollout.responses() for t in row]
    assert said and not set(said) & set(banned)

    logprobs, entropy = rl.policy_logprobs(model, exp.rollout, 0.7)      # as the update
    assert logprobs.requires_grad
    assert torch.equal(logprobs.detach(), exp.logprobs)                  # bitwise
    assert torch.equal(entropy.detach(), exp.entropy)
    loss, stats = ppo_loss(logprobs, exp.logprobs, torch.linspace(-1, 1, 9),
                           exp.rollout.response_mask, agg="seq-mean-token-mean")
    assert stats["ratio_mean"].item() == 1.0 and stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    loss.backward()
    metrics, _ = rl.rollout_metrics([exp])
    assert metrics["rollout/logprob_drift"] < 1e-4
    # the unbanned policy's log-probs: the banned ids hold most of the mass
    assert float(exp.logprobs[exp.rollout.response_mask == 1].max()) < -2


def test_bad_token_ids_setting(tmp_path):
    """--bad-token-ids: read by settings.parse_bad_token_ids, turned into ids with the
    tokenizer by rl.resolve_bad_token_ids, carried into Sampling by run_prompts; a flag of
    each RL trainer, in config.toml too."""
    from kernelrl.train.config import config_from_args, config_to_toml, save_config

    parse = settings.parse_bad_token_ids
    assert parse("special") == (True, ()) and parse(" Special ") == (True, ())
    assert parse("") == parse("none") == parse(" NONE ") == (False, ())
    assert parse("3, 5,3,special,") == (True, (3, 5))
    assert parse("7") == (False, (7,))
    for bad in ("pad", "-1", "1.5", "+2", "special;3", "none,3", "٣"):
        with pytest.raises(ValueError, match="--bad-token-ids: expected comma-separated"):
            parse(bad)
    with pytest.raises(ValueError, match="--bad-token-ids: expected"):
        parse([1, 2])

    tok = make_tokenizer()
    eos = tok.eos_token_id
    specials = tuple(sorted(VOCAB[t] for t in SPECIALS if t != "</s>"))
    resolve = rl.resolve_bad_token_ids
    assert resolve("special", tok, eos_token_id=eos) == specials
    assert resolve("special,9,4", tok, eos_token_id=eos) == tuple(sorted(specials + (4, 9)))
    assert resolve("", tok, eos_token_id=eos) == resolve("none", tok, eos_token_id=eos) == ()
    assert resolve([9, 4], tok, eos_token_id=eos) == (4, 9)
    # the pad token is EOS (a common setting): it stays allowed
    assert resolve("special", tok, eos_token_id=VOCAB["<pad>"]) == \
        tuple(sorted(VOCAB[t] for t in SPECIALS if t != "<pad>"))
    with pytest.raises(ValueError, match=f"--bad-token-ids: {eos} is the EOS token"):
        resolve(f"special,{eos}", tok, eos_token_id=eos)
    with pytest.raises(ValueError, match="--bad-token-ids: expected token ids"):
        resolve([1, -2], tok, eos_token_id=eos)

    for module, config in ((grpo, grpo.GRPOConfig), (ppo, ppo.PPOConfig)):
        base = ["--model", "m", "--data", "d", "--out", "o", "--reward-fn",
                "rl_helpers:marker_reward"]
        assert config_from_args(config, base).bad_token_ids == "special"
        for value in ("", "none", "1,2", "special,5"):
            cfg = config_from_args(config, base + ["--bad-token-ids", value])
            assert cfg.bad_token_ids == value
            assert f"bad_token_ids = {value!r}".replace("'", '"') in config_to_toml(cfg)
            path = save_config(cfg, tmp_path / "config.toml")
            assert config_from_args(config, ["--config", str(path)]) == cfg
        with pytest.raises(ValueError, match="--bad-token-ids: expected"):
            config(model="m", data="d", out="o", reward_fn="rl_helpers:marker_reward",
                   bad_token_ids="bos")

    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(3))
    cfg = ppo.PPOConfig(model="m", data=str(prompts), out="o",
                        reward_fn="rl_helpers:marker_reward", max_new_tokens=8)
    assert rl.run_prompts(cfg, tok)[2].bad_token_ids == specials
    cfg = dataclasses.replace(cfg, bad_token_ids="")
    assert rl.run_prompts(cfg, tok)[2].bad_token_ids == ()
    cfg = dataclasses.replace(cfg, bad_token_ids=str(eos))
    with pytest.raises(ValueError, match=f"--bad-token-ids: {eos} is the EOS token"):
        rl.run_prompts(cfg, tok)


def test_reference_copy_stays_the_initial_model(model_dir):
    tok, data = _samples(2)
    model = _policy(model_dir, lora=False)
    reference, line = rl.Reference.for_policy(model, common.TrainConfig(
        model=str(model_dir), data="-", out="-"), torch.device("cpu"))
    assert "frozen copy" in line and not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    exp = rl.collect_experience(model, data.samples, sampling=_sampling(data),
                                reward=rl.RewardFunction(length_reward, tok), repeats=2)
    assert exp.ref_logprobs is None and exp.kl is None
    assert exp.rewards.dtype == torch.float32
    assert exp.rewards.tolist() == [len(t.split()) for t in exp.rollout.texts(tok)]
    before = reference.logprobs(exp.rollout, 0.7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    torch.testing.assert_close(reference.logprobs(exp.rollout, 0.7), before, rtol=0, atol=0)
    assert not torch.allclose(rl.policy_logprobs(model, exp.rollout, 0.7)[0].detach(), before)


def test_reward_function_output_checks(model_dir):
    tok, data = _samples(2)
    model = _policy(model_dir, lora=False)
    exp = rl.collect_experience(model, data.samples, sampling=_sampling(data),
                                reward=rl.RewardFunction(marker_reward, tok))
    for fn, message in ((lambda p, r: [1.0], "returned 1 scores for 2 responses"),
                        (lambda p, r: [1.0, math.nan], "returned nan for response 1"),
                        (lambda p, r: "ab", "expected a list of numbers or a tensor")):
        with pytest.raises(ValueError, match="--reward-fn: " + message):
            rl.RewardFunction(fn, tok)(exp.rollout, exp.samples)


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, -1.0])
    finished = torch.tensor([True, False, False])
    assert rl.apply_missing_eos_penalty(scores, finished, None) is scores
    assert rl.apply_missing_eos_penalty(scores, finished, 1.5).tolist() == [1.0, 0.5, -2.5]
    assert rl.apply_missing_eos_penalty(scores, finished, -1.0).tolist() == [1.0, 3.0, 0.0]


def test_missing_eos_penalty_in_experience(model_dir):
    tok, data = _samples(2)
    model = _policy(model_dir, lora=False)
    torch.manual_seed(5)
    exp = rl.collect_experience(model, data.samples, sampling=_sampling(data, max_new_tokens=2),
                                reward=rl.RewardFunction(marker_reward, tok), repeats=4,
                                missing_eos_penalty=10.0)
    cut = ~exp.rollout.finished
    assert cut.any()                        # two tokens: most rows are cut off
    assert torch.equal(exp.scores, exp.rewards - 10.0 * cut.float())


def test_disable_dropout():
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3))
    layer[0].attention_dropout = 0.1
    rl.disable_dropout(layer)
    assert layer[1].p == 0.0 and layer[0].attention_dropout == 0.0


def test_disable_dropout_turns_off_moe_router_jitter():
    """Router jitter in the update's forward would move the ratio off 1 like dropout."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from kernelrl.nn import SparseMoE
    cfg = MixtralConfig(hidden_size=8, intermediate_size=4, num_local_experts=4,
                        num_experts_per_tok=2, router_jitter_noise=0.1)
    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():              # a bare block's weights are uninitialised memory
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    ours = SparseMoE.from_hf(hf)
    assert hf.jitter_noise == ours.jitter_noise == 0.1
    model = torch.nn.ModuleList([hf, ours]).train()
    x = torch.randn(1, 5, 8)
    assert not torch.equal(ours(x), ours(x))              # the noise, before
    rl.disable_dropout(model)
    assert hf.jitter_noise == ours.jitter_noise == 0.0
    assert torch.equal(ours(x), ours(x)) and model.training


# ----------------------------------------------------------------------------------------
# Reward models


@pytest.fixture(scope="module")
def rm_run(model_dir, tmp_path_factory):
    """A 2-step LoRA reward-model run on the tiny model."""
    folder = tmp_path_factory.mktemp("rm")
    data = write_jsonl(folder / "pairs.jsonl", ranked_examples(16, seed=2))
    out = folder / "run"
    assert rm.main(cli_args(model_dir, data, out, "--max-steps", 2, device="cpu", lr=1e-2,
                            lora_r=4, lora_alpha=8)) == 0
    return out


def _scores_one_by_one(reward_model, rollout, samples):
    """Each row scored alone, right-padded as the RM trainer batches: prompt + response."""
    responses = rollout.responses()
    out = []
    for sample, response in zip(samples, responses):
        ids = torch.tensor([sample.ids + response])
        with torch.no_grad():
            out.append(reward_model(ids, torch.ones_like(ids)).item())
    return torch.tensor(out)


def test_lora_reward_model_shares_the_lora_policys_base(model_dir, rm_run):
    tok, data = _samples(2)
    policy = _policy(model_dir, lora=True)
    trainable = common.trainable_state(policy).keys()
    reward, line = rl.build_reward(reward_model=str(rm_run), reward_fn=None, policy=policy,
                                   tokenizer=tok, model_path=str(model_dir))
    assert "on the policy's base" in line and "re-tokenised" not in line
    assert adapter_names(policy) == ["default", rl.REWARD_ADAPTER]
    assert active_adapter(policy) == "default"
    assert common.trainable_state(policy).keys() == trainable        # the RM stays frozen
    torch.manual_seed(3)
    exp = rl.collect_experience(policy, data.samples, sampling=_sampling(data),
                                reward=reward, repeats=3)
    assert policy.training and active_adapter(policy) == "default"
    alone = rm.load_reward_model(rm_run)
    expected = _scores_one_by_one(alone, exp.rollout, exp.samples)
    torch.testing.assert_close(exp.rewards, expected, rtol=0, atol=1e-5)

    full = _policy(model_dir, lora=False)
    own, line = rl.build_reward(reward_model=str(rm_run / "adapter"), reward_fn=None,
                                policy=full, tokenizer=tok, model_path=str(model_dir))
    assert "a model of its own" in line and not lora_modules(full)
    torch.testing.assert_close(own(exp.rollout, exp.samples), expected, rtol=0, atol=1e-5)


def test_reward_model_with_another_tokenizer_retokenises(model_dir, rm_run, tmp_path):
    export = tmp_path / "rm-export"
    shutil.copytree(rm_run / "adapter", export)
    tokens = SPECIALS + WORDS
    swapped = {t: i for i, t in enumerate(tokens[:4] + tokens[4:][::-1])}     # words reversed
    other = Tokenizer(models.WordLevel(swapped, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>",
                                    unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    other.save_pretrained(export)
    tok, data = _samples(2)
    policy = _policy(model_dir, lora=False)
    reward, line = rl.build_reward(reward_model=str(export), reward_fn=None, policy=policy,
                                   tokenizer=tok, model_path=str(model_dir))
    assert "re-tokenised" in line
    exp = rl.collect_experience(policy, data.samples, sampling=_sampling(data),
                                reward=reward, repeats=2)
    alone = rm.load_reward_model(export)
    expected = []
    for sample, text, done in zip(exp.samples, exp.rollout.texts(tok), exp.rollout.finished):
        ids = _data_layer_prompt(other, sample.text) + other.encode(text,
                                                                    add_special_tokens=False)
        ids = torch.tensor([ids + [other.eos_token_id] * int(done)])
        with torch.no_grad():
            expected.append(alone(ids, torch.ones_like(ids)).item())
    torch.testing.assert_close(exp.rewards, torch.tensor(expected), rtol=0, atol=1e-5)


def test_build_reward_errors(model_dir, tmp_path):
    tok = make_tokenizer()
    policy = _policy(model_dir, lora=False)
    args = dict(policy=policy, tokenizer=tok, model_path=str(model_dir))
    with pytest.raises(ValueError, match="--reward-model / --reward-fn: give exactly one"):
        rl.build_reward(reward_model=None, reward_fn=None, **args)
    with pytest.raises(FileNotFoundError, match="--reward-model: no such folder"):
        rl.build_reward(reward_model=str(tmp_path / "nothing"), reward_fn=None, **args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--reward-model: .*holds no reward model"):
        rl.build_reward(reward_model=str(tmp_path / "empty"), reward_fn=None, **args)
    reward, line = rl.build_reward(reward_model=None, reward_fn="rl_helpers:marker_reward",
                                   **args)
    assert line == "reward: rl_helpers:marker_reward" and reward.fn is marker_reward


# ----------------------------------------------------------------------------------------
# The shared settings, the update phase, KL controllers and the run state


@pytest.mark.parametrize("module, config", [(grpo, grpo.GRPOConfig), (ppo, ppo.PPOConfig)])
def test_rl_configs_are_flat_with_the_shared_fields_first(module, config, capsys):
    """Each RL trainer's config holds every TrainConfig field, then every RLConfig field,
    in that order, then its own; its command line has one flag per field, in that order."""
    base = [f.name for f in dataclasses.fields(common.TrainConfig)]
    shared = [f.name for f in dataclasses.fields(settings.RLConfig)]
    names = [f.name for f in dataclasses.fields(config)]
    assert shared[:len(base)] == base and len(shared) > len(base)
    assert names[:len(shared)] == shared and len(names) > len(shared)
    listed = re.findall(r"^  (--[a-z-]+)", help_text(module, capsys), re.MULTILINE)
    assert listed == ["--config"] + ["--" + name.replace("_", "-") for name in names]
    cfg = config(model="m", data="d", out="o", reward_fn="rl_helpers:marker_reward")
    assert (cfg.lr, cfg.num_ppo_epochs) == {grpo: (1e-6, 1), ppo: (3e-6, 4)}[module]


def _updates(rows, mini_batch_size, epochs=2, seed=5):
    """``run_updates`` over micro-batches of ``rows`` rows each (2 prompts a micro-batch)
    with a loss that only counts: micro-batch i has loss (i + 1)·weight and statistic
    ``x`` = i·weight. Returns (its Updates, the calls (i, weight), the optimizer steps,
    the scheduler's steps)."""
    w = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([w], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    experience = [SimpleNamespace(rollout=SimpleNamespace(batch_size=n)) for n in rows]
    cfg = SimpleNamespace(batch_size=2, grad_accum=len(rows), mini_batch_size=mini_batch_size,
                          num_ppo_epochs=epochs, max_grad_norm=1.0)
    calls = []

    def micro_loss(i, weight):
        calls.append((i, weight))
        return (w * 0).sum() + (i + 1) * weight, {"x": torch.tensor(float(i)) * weight}

    torch.manual_seed(seed)
    update = rl_update.run_updates(experience, micro_loss, cfg, step=1, weigh_by="rows",
                                   params=[w], optimizer=optimizer, scheduler=scheduler)
    return update, calls, len(steps), scheduler.last_epoch


def test_run_updates_by_hand():
    """3 micro-batches of 2, 3 and 1 rows, 2 of them an update (mini-batches of 2 and 1),
    2 epochs: 4 updates, the micro-batches in a fresh order each epoch from the global
    RNG, each weighed by its share of its mini-batch's rows, the schedule advanced once
    (after the last update), the loss and statistics the means of the updates' sums."""
    update, calls, steps, schedule = _updates([2, 3, 1], mini_batch_size=4)
    torch.manual_seed(5)
    orders = [torch.randperm(3).tolist() for _ in range(2)]
    rows = {0: 2, 1: 3, 2: 1}
    expected, sums = [], []
    for order in orders:
        for mini in (order[:2], order[2:]):
            total = sum(rows[i] for i in mini)
            expected += [(i, rows[i] / total) for i in mini]
            sums.append([sum((i + 1) * rows[i] / total for i in mini),
                         sum(i * rows[i] / total for i in mini)])
    assert calls == expected
    assert (steps, schedule, update.lr, update.grad_norm) == (4, 1, 0.5, 0.0)
    assert update.means == {"loss": pytest.approx(sum(s[0] for s in sums) / 4),
                            "x": pytest.approx(sum(s[1] for s in sums) / 4)}
    assert update.seconds > 0

    # One mini-batch (the whole step): the order sampled, nothing drawn from the RNG.
    update, calls, steps, schedule = _updates([2, 3, 1], mini_batch_size=None, seed=7)
    drawn = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(1))
    assert [i for i, _ in calls] == [0, 1, 2] * 2 and (steps, schedule) == (2, 1)
    assert update.means["loss"] == pytest.approx((1 * 2 + 2 * 3 + 3 * 1) / 6)


def test_run_updates_stops_on_a_nan_loss_before_the_weights_change():
    from kernelrl.train.metrics import NonFiniteLossError

    w = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([w], lr=0.5)
    experience = [SimpleNamespace(rollout=SimpleNamespace(batch_size=1))]
    cfg = SimpleNamespace(batch_size=1, grad_accum=1, mini_batch_size=None, num_ppo_epochs=1,
                          max_grad_norm=1.0)
    with pytest.raises(NonFiniteLossError, match="at step 9"):
        rl_update.run_updates(
            experience, lambda i, weight: ((w * float("nan")).sum(), {}), cfg, step=9,
            weigh_by="rows", params=[w], optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    assert w.item() == 1.0


def test_adaptive_kl_controller_by_hand():
    ctl = rl_update.AdaptiveKLController(0.2, target=6.0, horizon=1000)
    # KL 9: 9/6 − 1 = 0.5, clipped to 0.2; n = 100 → β·(1 + 0.2·0.1)
    assert ctl.update(9.0, 100) == pytest.approx(0.2 * 1.02)
    # KL 6.6: error 0.1 → ·(1 + 0.1·0.05)
    assert ctl.update(6.6, 50) == pytest.approx(0.2 * 1.02 * 1.005)
    # KL 0: error −1 → −0.2; n = 1000 → ·0.8
    assert ctl.update(0.0, 1000) == pytest.approx(0.2 * 1.02 * 1.005 * 0.8)
    # on target: unchanged
    assert ctl.update(6.0, 500) == pytest.approx(0.2 * 1.02 * 1.005 * 0.8)

    again = rl_update.AdaptiveKLController(0.2, target=6.0, horizon=1000)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value
    assert again.update(3.0, 10) == ctl.update(3.0, 10)          # error −0.5 → −0.2

    assert rl.kl_controller is rl_update.kl_controller                 # re-exported
    fixed = rl_update.kl_controller(0.05)
    assert isinstance(fixed, rl_update.FixedKLController) and fixed.update(100.0, 10) == 0.05
    assert isinstance(rl_update.kl_controller(0.05, 1.0, 10), rl_update.AdaptiveKLController)
    for args, name in (((-1.0, 1.0, 1), "init_kl_coef"), ((1.0, 0.0, 1), "target"),
                       ((1.0, 1.0, 0), "horizon")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            rl_update.AdaptiveKLController(*args)


def test_run_state_round_trip():
    sampler = ResumableSampler([1] * 10, 3, seed=1, num_epochs=None)

    class Loader:
        def __init__(self):
            self.sampler = sampler

        def __len__(self):
            return len(sampler)

        def state_dict(self):
            return sampler.state_dict()

        def load_state_dict(self, s):
            sampler.load_state_dict(s)

    ctl = rl_update.AdaptiveKLController(0.1, 2.0, 100)
    state = rl_update.RunState(Loader(), kl_controller=ctl)
    batches = iter(sampler)
    for _ in range(5):
        next(batches)
    ctl.update(5.0, 10)
    saved = state.state_dict()
    assert len(state) == 4 and saved["prompts"]["epoch"] == 1
    assert saved["kl_controller"] == {"value": ctl.value}
    expected = next(iter(sampler))
    other = rl_update.AdaptiveKLController(0.1, 2.0, 100)
    rl_update.RunState(Loader(), kl_controller=other).load_state_dict(saved)
    assert other.value == ctl.value and next(iter(sampler)) == expected
    with pytest.raises(ValueError, match=r"lacks \['kl_controller'\]"):
        state.load_state_dict({"prompts": saved["prompts"]})
