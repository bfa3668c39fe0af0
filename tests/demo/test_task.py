"""The demo task (kernelrl.demo.task) and its shipped data (kernelrl/demo/data).

What is checked and why:
  * the gold rule on hand-written examples, with every expected score worked out by hand
    (U − B − 0.5·R − length penalty), and its dependence on the prompt's topic;
  * the shipped files: sizes and schemas as documented in make_data, a total under 400 KB,
    rankings strictly ordered by the gold rule, and byte-identical regeneration;
  * the tokenizer: every shipped prompt and response round-trips with no <unk>, the data
    layer tokenizes every line in the plain format, and a saved tokenizer loads back;
  * held-out prompts are disjoint from every training prompt;
  * room to improve: the SFT demonstrations' mean gold score is below 0 and more than 3
    under the rankings' best responses' (the best possible is +6), the ranks' mean scores
    strictly ordered;
  * learnability: a bag-of-words Bradley-Terry scorer that sees the prompt's topic ranks
    held-out pairs 95 % right (a reward model can learn the rule), one blind to the prompt
    only 65 % (it has to read the prompt).
"""

from __future__ import annotations

import json
import statistics
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from kernelrl.demo import make_data, task
from kernelrl.demo.task import (VOCAB, build_tokenizer, data_path, gold_score, model_config,
                                prompt_topic, save_tokenizer, score_responses, win_rate)
from kernelrl.models.hf import check_supported, load_tokenizer
from kernelrl.train.data import (load_preferences, load_sft, ranking_pairs, read_jsonl,
                                 read_preferences, read_sft)

MAX_TOTAL_BYTES = 400_000
SCHEMAS = {"sft.jsonl": ["prompt", "response"], "preferences.jsonl": ["prompt", "responses"],
           "heldout_preferences.jsonl": ["prompt", "responses"], "prompts.jsonl": ["prompt"],
           "heldout_prompts.jsonl": ["prompt"]}


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in data_path(name).read_text("ascii").splitlines()]


def texts(name: str) -> list[str]:
    """Every prompt and response string of a shipped file."""
    out = []
    for row in rows(name):
        out.append(row["prompt"])
        out += [row["response"]] if "response" in row else row.get("responses", [])
    return out


# ---- the gold rule ---------------------------------------------------------------------------

GOLD_EXAMPLES = [
    # prompt, response, expected: U − B − 0.5·R − max(0, 3 − n) − max(0, n − 8)
    ("describe cats :", " fluffy purring whiskers curious graceful paws", 6.0),   # U=6
    ("describe cats :", "", -3.0),                                 # n=0: 3 words short
    ("describe cats :", " fluffy", -1.0),                          # U=1, 2 short
    ("cats :", " fluffy" * 8, -2.5),                               # U=1, R=7
    ("tell me about dogs :", " very loyal and friendly", 2.0),     # U=2, fillers 0
    ("tell me about dogs :", " fluffy purring whiskers", -3.0),    # another topic: B=3
    ("talk about ocean :", " waves boring salty ugly", 0.0),       # U=2, B=2
    ("describe coffee :", " bitter aroma roasted espresso caffeine mug very so and", 5.0),
    # ^ U=6, n=9: 1 over
    ("describe coffee :", " describe coffee :", -3.0),             # echoed prompt: B=3
    ("write about rain :", " wet wet very very", 0.0),             # U=1, R=2
    ("write about rain :", " Wet drizzle", -1.0),                  # "Wet" unknown: U=1 B=1, 1 short
    ("summer :", " boring" * 12, -21.5),                           # B=12, R=11, 4 over
    ("what is nice about books :", " pages stories pages novels sad", 1.5),  # U=3 B=1 R=1
    ("give me words for trains :", " very so and", 0.0),           # fillers only
    ("say something about space :", "  stars\tplanets \n orbit ", 3.0),  # any whitespace
]


@pytest.mark.parametrize("prompt,response,expected", GOLD_EXAMPLES)
def test_gold_score_hand_examples(prompt, response, expected):
    assert gold_score(prompt, response) == expected


def test_gold_score_depends_on_the_prompt_topic():
    response = " fluffy purring whiskers"
    for topic in task.TOPICS:
        for j in range(len(task.TEMPLATES)):
            expected = 3.0 if topic == "cats" else -3.0
            assert gold_score(task.make_prompt(topic, j), response) == expected


def test_gold_score_best_is_six_and_range_is_smooth():
    prompt = "describe winter :"
    words = list(task.TOPICS["winter"])
    assert gold_score(prompt, " " + " ".join(words + ["very", "so"])) == task.MAX_SCORE
    assert gold_score(prompt, " " + " ".join(words + ["very", "so", "and"])) == 5.0
    scores = {s for r in rows("preferences.jsonl") for s in
              score_responses([r["prompt"]] * 4, r["responses"])}
    assert max(scores) == 6.0 and all(s * 2 == int(s * 2) for s in scores)
    assert len(scores) > 25                   # many levels, not just good/bad


def test_prompt_topic_and_make_prompt():
    assert prompt_topic("what is nice about books :") == "books"
    assert task.make_prompt("rain", 7) == "rain :"
    for bad in ("describe :", "describe cats and dogs :", "describe cat :"):
        with pytest.raises(ValueError, match="topic"):
            prompt_topic(bad)
    with pytest.raises(ValueError, match="topic"):
        task.make_prompt("cat")


def test_score_responses_and_win_rate():
    assert score_responses(["cats :", "dogs :"], [" fluffy paws curious", ""]) == [3.0, -3.0]
    assert win_rate([1, 2, 3], [1, 1, 4]) == 0.5           # tie ½ + win 1 + loss 0
    assert win_rate([3, 3], [1, 1]) == 1.0
    assert win_rate([0.5], [0.5]) == 0.5
    with pytest.raises(ValueError, match="equal lengths"):
        win_rate([1], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        win_rate([], [])
    with pytest.raises(ValueError, match="equal lengths"):
        score_responses(["cats :"], [])


# ---- vocabulary, tokenizer, model ------------------------------------------------------------

def test_vocabulary_layout():
    assert [VOCAB[t] for t in task.SPECIALS] == [0, 1, 2, 3]
    assert len(set(VOCAB.values())) == len(VOCAB) == 146
    words = (list(task.PROMPT_WORDS) + list(task.FILLER) + list(task.NEGATIVE)
             + [w for ws in task.TOPICS.values() for w in ws])
    assert len(words) == len(set(words)) == len(VOCAB) - len(task.SPECIALS)
    assert all(len(ws) == 6 for ws in task.TOPICS.values()) and len(task.TOPICS) == 16
    assert abs(sum(w["share"] for w in task.WRITERS.values()) - 1.0) < 1e-12


def test_tokenizer_round_trips_every_shipped_line():
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for name in make_data.FILES:
        for text in texts(name):
            ids = tok.encode(text, add_special_tokens=False)
            assert unk not in ids, (name, text)
            assert len(ids) == len(text.split())
            assert tok.decode(ids) == " ".join(text.split())


def test_data_layer_reads_every_line_in_plain_format():
    tok = build_tokenizer()
    assert not getattr(tok, "chat_template", None)
    sft, _ = load_sft(data_path("sft.jsonl"), tok, max_length=32)
    assert sft.stats.kept == 2000 and sft.stats.truncated == 0
    for sample in sft.samples:      # BOS, prompt, response, EOS
        assert sample.input_ids[0] == tok.bos_token_id
        assert sample.input_ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in sample.input_ids
    first = read_sft(data_path("sft.jsonl"))[0]
    expected = tok.encode(first.prompt + first.response, add_special_tokens=False)
    assert sft.samples[0].input_ids == [tok.bos_token_id] + expected + [tok.eos_token_id]
    for name in ("preferences.jsonl", "heldout_preferences.jsonl"):
        prefs, _ = load_preferences(data_path(name), tok, max_length=32)
        assert prefs.stats.dropped == 0 and prefs.stats.truncated == 0
        assert prefs.stats.pairs == make_data.SIZES[name] * 6


def test_saved_tokenizer_loads_back(tmp_path):
    folder = save_tokenizer(tmp_path / "tok")
    loaded = load_tokenizer(folder)
    built = build_tokenizer()
    for text in ("describe cats :", " fluffy purring very whiskers", " nonsense words"):
        assert (loaded.encode(text, add_special_tokens=False)
                == built.encode(text, add_special_tokens=False))
    assert (loaded.pad_token, loaded.unk_token, loaded.bos_token, loaded.eos_token) == \
        ("<pad>", "<unk>", "<s>", "</s>")
    assert loaded.decode([VOCAB["fluffy"], VOCAB["paws"], VOCAB["</s>"]],
                         skip_special_tokens=True) == "fluffy paws"


@pytest.mark.parametrize("size,params", [("default", 529_792), ("small", 100_928)])
def test_model_config_builds_a_supported_llama(size, params):
    config = model_config(size)
    tok = build_tokenizer()
    assert config.vocab_size == len(tok) == len(VOCAB)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    check_supported(model)
    assert sum(p.numel() for p in model.parameters()) == params
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("describe cats : fluffy paws",
                                                        add_special_tokens=False)])
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


def test_model_config_rejects_unknown_size():
    with pytest.raises(ValueError, match="size"):
        model_config("huge")


# ---- shipped data ----------------------------------------------------------------------------

def test_data_path():
    path = data_path("sft.jsonl")
    assert path.is_file() and path.parent.name == "data" and path.parent.parent.name == "demo"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data_path("nope.jsonl")


def test_data_path_from_a_zipped_package(tmp_path, monkeypatch):
    """A package imported from a zip has no file paths: the file is extracted."""
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("kernelrl/demo/data/prompts.jsonl", data_path("prompts.jsonl").read_bytes())
    monkeypatch.setattr(task.resources, "files",
                        lambda package: zipfile.Path(archive, "kernelrl/demo/"))
    path = task.data_path("prompts.jsonl")
    assert isinstance(path, Path) and path.is_file()
    assert path.read_bytes() == (Path(task.__file__).parent / "data" / "prompts.jsonl").read_bytes()


def test_shipped_files_sizes_and_schemas():
    folder = data_path("sft.jsonl").parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(make_data.FILES)
    assert sum((folder / n).stat().st_size for n in make_data.FILES) < MAX_TOTAL_BYTES
    for name, keys in SCHEMAS.items():
        parsed = read_jsonl(data_path(name))
        assert len(parsed) == make_data.SIZES[name], name
        for _, row in parsed:
            assert list(row) == keys
            assert all(isinstance(v, str) for v in [row["prompt"], *row.get("responses", [])])
    assert len(read_sft(data_path("sft.jsonl"))) == 2000
    for name in ("preferences.jsonl", "heldout_preferences.jsonl"):
        for record in read_preferences(data_path(name)):
            assert len(record.responses) == make_data.RANKING_K
            assert all(r.startswith(" ") for r in record.responses)
    assert all(r["response"].startswith(" ") for r in rows("sft.jsonl"))


def test_rankings_are_strictly_ordered_by_gold():
    for name in ("preferences.jsonl", "heldout_preferences.jsonl"):
        for row in rows(name):
            scores = [gold_score(row["prompt"], r) for r in row["responses"]]
            assert all(a > b for a, b in zip(scores, scores[1:])), row


def test_data_regenerates_byte_identically(tmp_path):
    make_data.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(make_data.FILES)
    for name in make_data.FILES:
        assert (tmp_path / name).read_bytes() == data_path(name).read_bytes(), name


def test_heldout_prompts_disjoint_from_training_prompts():
    train, held_out = make_data.split_prompts()
    assert len(train) == 96 and len(held_out) == 32 and not set(train) & set(held_out)
    assert [r["prompt"] for r in rows("heldout_prompts.jsonl")] == held_out
    used_in_training = {r["prompt"] for n in ("sft.jsonl", "preferences.jsonl", "prompts.jsonl")
                        for r in rows(n)}
    assert used_in_training <= set(train) and not used_in_training & set(held_out)
    assert {r["prompt"] for r in rows("heldout_preferences.jsonl")} <= set(held_out)
    # every topic and every phrasing is trained on; held-out prompts are new combinations
    topics = [prompt_topic(p) for p in held_out]
    assert all(topics.count(t) == 2 for t in task.TOPICS)
    phrasings = [next(j for j in range(8) if task.make_prompt(prompt_topic(p), j) == p)
                 for p in held_out]
    assert all(phrasings.count(j) == 4 for j in range(8))
    assert {prompt_topic(p) for p in used_in_training} == set(task.TOPICS)


def test_sft_data_leaves_room_to_improve():
    sft = [gold_score(r["prompt"], r["response"]) for r in rows("sft.jsonl")]
    ranked = [[gold_score(r["prompt"], y) for y in r["responses"]]
              for r in rows("preferences.jsonl")]
    by_rank = [statistics.mean(s[k] for s in ranked) for k in range(4)]
    # the ranking orders quality: each rank's mean gold score strictly above the next's
    assert all(a > b for a, b in zip(by_rank, by_rank[1:]))
    assert statistics.mean(sft) < 0 < by_rank[0]
    assert by_rank[0] - statistics.mean(sft) > 3.0
    assert sum(s == task.MAX_SCORE for s in sft) / len(sft) < 0.1
    assert statistics.pstdev(sft) > 3.0       # mixed quality, not uniformly mediocre


# ---- learnability ----------------------------------------------------------------------------

_TOPIC_INDEX = {t: i for i, t in enumerate(task.TOPICS)}
_MAX_WORDS = 12


def bag_of_words(prompt: str, response: str, see_prompt: bool) -> np.ndarray:
    """Generic features: which vocabulary words the response contains (and, seeing the
    prompt, the same again in the block of the prompt's topic), its number of repeated
    words, and its length (one-hot, capped)."""
    v = len(VOCAB)
    blocks = len(task.TOPICS) + 1
    x = np.zeros(v * blocks + 1 + _MAX_WORDS + 1, dtype=np.float32)
    words = response.split()
    block = v * (_TOPIC_INDEX[prompt_topic(prompt)] + 1)
    for word in set(words):
        i = VOCAB.get(word, VOCAB["<unk>"])
        x[i] = 1.0
        if see_prompt:
            x[block + i] = 1.0
    x[v * blocks] = len(words) - len(set(words))
    x[v * blocks + 1 + min(len(words), _MAX_WORDS)] = 1.0
    return x


def pair_differences(name: str, see_prompt: bool) -> np.ndarray:
    """φ(better) − φ(worse) for every ranked pair of a preference file."""
    out = []
    for record in read_preferences(data_path(name)):
        f = [bag_of_words(record.prompt, y, see_prompt) for y in record.responses]
        out += [f[i] - f[j] for i, j in ranking_pairs(len(f))]
    return np.stack(out)


def fit_bradley_terry(diffs: np.ndarray, steps: int = 150, lr: float = 2.0,
                      l2: float = 1e-3) -> np.ndarray:
    """Logistic regression on pair differences (P(better ≻ worse) = σ(w·Δφ)), full-batch GD."""
    w = np.zeros(diffs.shape[1], dtype=np.float32)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(diffs @ w)))
        w -= lr * (-(diffs.T @ (1.0 - p)) / len(diffs) + l2 * w)
    return w


def test_bag_of_words_reward_learns_the_rule_and_needs_the_prompt():
    accuracy = {}
    for see_prompt in (True, False):
        w = fit_bradley_terry(pair_differences("preferences.jsonl", see_prompt))
        held_out = pair_differences("heldout_preferences.jsonl", see_prompt)
        accuracy[see_prompt] = float((held_out @ w > 0).mean())
    # measured: 0.953 seeing the prompt's topic, 0.649 blind to it
    assert accuracy[True] > 0.9, accuracy
    assert accuracy[False] < 0.75, accuracy
