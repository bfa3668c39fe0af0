"""kernelrl.train.data: JSONL parsing, its errors, formatting, labels, truncation, splits."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kernelrl.train.data import (IGNORE_INDEX, PreferenceRecord, SFTRecord, load_preferences,
                                 load_sft, ranking_pairs, read_preferences, read_sft,
                                 split_records, tokenize_preferences, tokenize_sft)

X = IGNORE_INDEX
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ("hi hello there how are you fine good bad ok what is one two three four five six "
         "seven a b c d e f user assistant system :").split()
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
PAD, BOS, EOS, USER, ASSISTANT, SYSTEM, END = 0, 2, 3, 4, 5, 6, 7
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
            "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(chat_template: str | None = None, eos: str = "</s>", bos: str | None = "<s>"):
    """A word-level tokenizer over VOCAB (whitespace and punctuation split)."""
    model = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", unk_token="<unk>",
                                  bos_token=bos, eos_token=eos,
                                  additional_special_tokens=SPECIALS[4:])
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


class CountingTokenizer:
    """Delegates to a tokenizer and records every text given to encode."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.encoded = []

    def encode(self, text, **kwargs):
        self.encoded.append(text)
        return self._tokenizer.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


# ---------------------------------------------------------------------------------------
# Parsing

def test_parse_sft_formats_and_blank_lines(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path, [{"prompt": "hi", "response": "hello", "id": 7}, "", "   ",
                                  {"messages": messages},
                                  {"prompt": messages[:1], "response": "fine"}])
    records = read_sft(path)
    assert records == [
        SFTRecord(f"{path}:1", prompt="hi", response="hello"),
        SFTRecord(f"{path}:4", messages=messages),
        SFTRecord(f"{path}:5", prompt=messages[:1], response="fine"),
    ]


def test_parse_preference_formats(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "hi", "chosen": "good", "rejected": "bad"},
                                  {"prompt": "hi", "responses": ["a", "b", "c"]}])
    assert read_preferences(path) == [PreferenceRecord(f"{path}:1", "hi", ["good", "bad"]),
                                      PreferenceRecord(f"{path}:2", "hi", ["a", "b", "c"])]


SFT_ERRORS = [
    ('{"prompt": "a",', "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got array"),
    ({"prompt": "a"}, 'missing "response"'),
    ({"response": "a"}, 'missing "prompt"'),
    ({"prompt": "a", "response": 3}, '"response" must be a string, got number'),
    ({"prompt": None, "response": "a"}, '"prompt" must be a string, got null'),
    ({"messages": []}, '"messages" must be a non-empty array'),
    ({"messages": "hi"}, '"messages" must be a non-empty array'),
    ({"messages": [{"content": "hi"}]}, '"messages"[0]: missing "role"'),
    ({"messages": [{"role": "user", "content": 1}]}, '"messages"[0]: "content" must be a string'),
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "starts with an assistant"),
    ({"messages": [{"role": "user", "content": "a"}], "prompt": "a"}, "has both"),
    ({"text": "a"}, 'expected {"prompt", "response"} or {"messages"}'),
]


@pytest.mark.parametrize("bad,message", SFT_ERRORS)
def test_sft_errors_name_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path, [{"prompt": "a", "response": "b"}, "", bad])
    with pytest.raises(ValueError) as err:
        read_sft(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


PREFERENCE_ERRORS = [
    ("{oops}", "not valid JSON"),
    ({"chosen": "a", "rejected": "b"}, 'missing "prompt"'),
    ({"prompt": "p", "chosen": "a"}, 'missing "rejected"'),
    ({"prompt": "p", "chosen": 1, "rejected": "b"}, '"chosen" must be a string, got number'),
    ({"prompt": "p", "responses": []}, "empty ranking"),
    ({"prompt": "p", "responses": ["a"]}, "K >= 2 responses, got K = 1"),
    ({"prompt": "p", "responses": "a"}, '"responses" must be an array'),
    ({"prompt": "p", "responses": ["a", 2]}, '"responses"[1] must be a string'),
    ({"prompt": "p", "responses": ["a", "b"], "chosen": "a"}, "has both"),
    ({"prompt": "p", "response": "a"}, 'expected "chosen" and "rejected"'),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, '"prompt" must be a non-empty array'),
]


@pytest.mark.parametrize("bad,message", PREFERENCE_ERRORS)
def test_preference_errors_name_file_and_line(tmp_path, bad, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path, [good, good, "", "", "", "", bad, good])
    with pytest.raises(ValueError) as err:
        read_preferences(path)
    assert str(err.value).startswith(f"{path}:7: ")
    assert message in str(err.value)


def test_file_errors(tmp_path):
    empty = write_jsonl(tmp_path, ["", " "])
    with pytest.raises(ValueError, match="no examples"):
        read_sft(empty)
    with pytest.raises(ValueError, match="no such file"):
        read_sft(tmp_path / "missing.jsonl")
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"^{bad_utf8}:2: not UTF-8"):
        read_sft(bad_utf8)


def test_ranking_pairs():
    assert ranking_pairs(2) == [(0, 1)]
    assert ranking_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert ranking_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


# ---------------------------------------------------------------------------------------
# Formatting and labels

def test_sft_plain_prompt_response():
    data = tokenize_sft([SFTRecord("f:1", prompt="hi there", response="hello")],
                        make_tokenizer(), max_length=32)
    (s,) = data.samples
    assert s.input_ids == [BOS, 8, 10, 9, EOS]
    assert s.labels == [X, X, X, 9, EOS]
    assert data.pad_token_id == PAD


def test_first_token_is_never_a_label():
    tok = make_tokenizer(bos=None)
    (s,) = tokenize_sft([SFTRecord("f:1", prompt="", response="hello there")], tok,
                        max_length=32).samples
    assert s.input_ids == [9, 10, EOS]
    assert s.labels == [X, 10, EOS]
    data = tokenize_sft([SFTRecord("f:1", prompt="", response="")], tok, max_length=32)
    assert data.samples == [] and data.stats.dropped == 1     # only EOS: nothing to learn


def test_sft_chat_template_prompt_response():
    tok = make_tokenizer(TEMPLATE)
    (s,) = tokenize_sft([SFTRecord("f:1", prompt="hi", response="hello there")], tok,
                        max_length=32).samples
    # <s><|user|> hi <|end|>\n<|assistant|> | hello there <|end|> </s>
    assert s.input_ids == [BOS, USER, 8, END, ASSISTANT, 9, 10, END, EOS]
    assert s.labels == [X, X, X, X, X, 9, 10, END, EOS]
    # use_chat_template=False: the plain format even though the tokenizer has a template
    (s,) = tokenize_sft([SFTRecord("f:1", prompt="hi", response="hello there")], tok,
                        max_length=32, use_chat_template=False).samples
    assert s.input_ids == [BOS, 8, 9, 10, EOS]


def test_sft_messages_chat_template_labels_every_assistant_turn():
    messages = [{"role": "system", "content": "ok"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine"}]
    (s,) = tokenize_sft([SFTRecord("f:1", messages=messages)], make_tokenizer(TEMPLATE),
                        max_length=64).samples
    prompt1 = [BOS, SYSTEM, VOCAB["ok"], END, USER, VOCAB["hi"], END, ASSISTANT]
    prompt2 = [USER] + ids("how are you") + [END, ASSISTANT]
    assert s.input_ids == prompt1 + [VOCAB["hello"], END] + prompt2 + [VOCAB["fine"], END, EOS]
    assert s.labels == ([X] * 8 + [VOCAB["hello"], END] + [X] * 6
                        + [VOCAB["fine"], END, EOS])


def test_sft_messages_plain_format():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine"}]
    (s,) = tokenize_sft([SFTRecord("f:1", messages=messages)], make_tokenizer(),
                        max_length=64).samples
    # user: hi\nassistant: | hello\n | user: how are you\nassistant: | fine </s>
    assert s.input_ids == ([BOS] + ids("user : hi assistant :") + ids("hello")
                           + ids("user : how are you assistant :") + ids("fine") + [EOS])
    assert s.labels == [X] * 6 + ids("hello") + [X] * 7 + ids("fine") + [EOS]


def test_response_already_ending_with_eos_gets_no_second_eos():
    tok = make_tokenizer(TEMPLATE, eos="<|end|>")
    (s,) = tokenize_sft([SFTRecord("f:1", prompt="hi", response="hello")], tok,
                        max_length=32).samples
    assert s.input_ids == [BOS, USER, 8, END, ASSISTANT, 9, END]
    assert s.labels == [X, X, X, X, X, 9, END]


def test_template_that_is_not_prefix_stable_is_an_error_naming_the_line():
    tok = make_tokenizer("{{ messages | length }}" + TEMPLATE)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match=r"^data\.jsonl:4: the chat template"):
        tokenize_sft([SFTRecord("data.jsonl:4", messages=messages)], tok, max_length=32)
    with pytest.raises(ValueError, match=r"^data\.jsonl:5: the chat template"):
        tokenize_preferences([PreferenceRecord("data.jsonl:5", "hi", ["a", "b"])], tok,
                             max_length=32)


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_ranking_tokenizes_prompt_and_each_response_once(template):
    tok = CountingTokenizer(make_tokenizer(template))
    record = PreferenceRecord("f:1", "hi there", ["a", "b c", "d", "e f"])
    data = tokenize_preferences([record], tok, max_length=32)
    (s,) = data.samples
    assert len(tok.encoded) == 1 + 4            # the prompt once, each response once
    assert len(set(tok.encoded)) == 5
    assert s.pairs == ranking_pairs(4)
    assert [r[:-1] if template is None else r[:-2] for r in s.responses] == \
        [ids("a"), ids("b c"), ids("d"), ids("e f")]
    assert all(r[-1] == EOS for r in s.responses)
    expected_prompt = [BOS] + ids("hi there") if template is None else \
        [BOS, USER] + ids("hi there") + [END, ASSISTANT]
    assert s.prompt_ids == expected_prompt
    assert data.stats.as_dict() == dict(examples=1, kept=1, truncated=0, dropped=0, pairs=6,
                                        pairs_dropped=0)


def test_chosen_rejected_is_the_k2_ranking():
    tok = make_tokenizer()
    (s,) = tokenize_preferences([PreferenceRecord("f:1", "hi", ["good", "bad"])], tok,
                                max_length=16).samples
    assert s.prompt_ids == [BOS, 8]
    assert s.responses == [ids("good") + [EOS], ids("bad") + [EOS]]
    assert s.pairs == [(0, 1)]


# ---------------------------------------------------------------------------------------
# Over max_length

LONG_PROMPT = "one two three four five six"          # + BOS: 7 prompt tokens


def test_sft_truncation_keeps_bos_and_the_prompt_end_then_cuts_the_response_end():
    tok = make_tokenizer()
    record = SFTRecord("f:1", prompt=LONG_PROMPT, response="a b")   # 7 + 3 = 10 tokens
    data = tokenize_sft([record], tok, max_length=8)       # keep_prompt_tokens = 4
    (s,) = data.samples
    assert s.input_ids == [BOS] + ids("three four five six a b") + [EOS]
    assert s.labels == [X] * 5 + ids("a b") + [EOS]
    assert (data.stats.truncated, data.stats.dropped) == (1, 0)

    (s,) = tokenize_sft([record], tok, max_length=6, keep_prompt_tokens=4).samples
    assert s.input_ids == [BOS] + ids("four five six a b")   # the response lost its EOS
    assert s.labels == [X] * 4 + ids("a b")

    data = tokenize_sft([record], tok, max_length=6, keep_prompt_tokens=6)
    assert data.samples == []                                 # no response token left
    assert data.stats.as_dict() == dict(examples=1, kept=0, truncated=0, dropped=1, pairs=0,
                                        pairs_dropped=0)


def test_sft_drop_counts():
    records = [SFTRecord("f:1", prompt=LONG_PROMPT, response="a b"),      # 10 tokens
               SFTRecord("f:2", prompt="hi", response="hello"),          # 4 tokens
               SFTRecord("f:3", prompt="one two three", response="a b c d e")]  # 10
    data = tokenize_sft(records, make_tokenizer(), max_length=8, overlong="drop")
    assert [s.where for s in data.samples] == ["f:2"]
    assert data.stats.as_dict() == dict(examples=3, kept=1, truncated=0, dropped=2, pairs=0,
                                        pairs_dropped=0)
    data = tokenize_sft(records, make_tokenizer(), max_length=8, overlong="truncate")
    assert (data.stats.kept, data.stats.truncated, data.stats.dropped) == (3, 2, 0)
    assert all(len(s) <= 8 for s in data.samples)


def test_preference_truncation_shares_the_prompt_cut():
    tok = make_tokenizer()
    record = PreferenceRecord("f:1", "one two three", ["a b c d e f", "a", "b c"])
    data = tokenize_preferences([record], tok, max_length=8)   # prompt 4, keep 4
    (s,) = data.samples
    assert s.prompt_ids == [BOS] + ids("one two three")
    assert s.responses == [ids("a b c d"), ids("a") + [EOS], ids("b c") + [EOS]]
    assert data.stats.truncated == 1 and data.stats.pairs == 3

    (s,) = tokenize_preferences([record], tok, max_length=8, keep_prompt_tokens=2).samples
    assert s.prompt_ids == [BOS] + ids("three")
    assert s.responses == [ids("a b c d e f"), ids("a") + [EOS], ids("b c") + [EOS]]


def test_preference_with_no_response_left_is_dropped_with_its_pairs():
    record = PreferenceRecord("f:1", "one two three four five six seven a", ["b", "c", "d"])
    data = tokenize_preferences([record], make_tokenizer(), max_length=8, keep_prompt_tokens=8)
    assert data.samples == []
    assert data.stats.as_dict() == dict(examples=1, kept=0, truncated=0, dropped=1, pairs=0,
                                        pairs_dropped=3)


def test_preference_drop_removes_overlong_responses_and_their_pairs():
    tok = make_tokenizer()
    records = [PreferenceRecord("f:1", "one two three", ["a b c d e f", "a", "b c"]),
               PreferenceRecord("f:2", "one two three", ["a", "a b c d e f"])]
    data = tokenize_preferences(records, tok, max_length=8, overlong="drop")
    (s,) = data.samples
    assert s.where == "f:1"
    assert s.responses == [ids("a") + [EOS], ids("b c") + [EOS]]
    assert s.pairs == [(0, 1)]                  # was (1, 2) of the ranking
    assert data.stats.as_dict() == dict(examples=2, kept=1, truncated=0, dropped=1, pairs=1,
                                        pairs_dropped=3)


def test_option_errors():
    tok, rec = make_tokenizer(), [SFTRecord("f:1", prompt="hi", response="a")]
    with pytest.raises(ValueError, match="overlong: expected one of"):
        tokenize_sft(rec, tok, max_length=8, overlong="cut")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_sft(rec, tok, max_length=1)
    with pytest.raises(ValueError, match="keep_prompt_tokens"):
        tokenize_sft(rec, tok, max_length=8, keep_prompt_tokens=9)


# ---------------------------------------------------------------------------------------
# Held-out split and loading

def test_eval_split_is_deterministic_by_seed():
    records = list(range(40))
    train, held_out = split_records(records, 0.25, seed=3)
    assert len(held_out) == 10 and sorted(train + held_out) == records
    assert held_out == sorted(held_out) and train == sorted(train)   # file order kept
    assert split_records(records, 0.25, seed=3) == (train, held_out)
    assert split_records(records, 0.25, seed=4)[1] != held_out
    assert split_records(records, 0.0, seed=3) == (records, [])
    assert len(split_records(records, 0.001, seed=3)[1]) == 1
    with pytest.raises(ValueError, match="eval_fraction"):
        split_records(records, 1.0, seed=3)
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_records([1], 0.5, seed=3)


def test_load_with_eval_fraction_and_eval_path(tmp_path):
    lines = [{"prompt": "hi", "chosen": w, "rejected": "bad"} for w in WORDS[:10]]
    path = write_jsonl(tmp_path, lines)
    tok = make_tokenizer()
    train, held_out = load_preferences(path, tok, max_length=16, eval_fraction=0.2, seed=1)
    again = load_preferences(path, tok, max_length=16, eval_fraction=0.2, seed=1)[1]
    assert (len(train), len(held_out)) == (8, 2)
    assert [s.where for s in again.samples] == [s.where for s in held_out.samples]
    assert train.stats.examples == 8 and held_out.stats.examples == 2

    eval_path = write_jsonl(tmp_path, [{"prompt": "hi", "response": "ok"}], "eval.jsonl")
    sft_path = write_jsonl(tmp_path, [{"prompt": "hi", "response": "a"}] * 3, "sft.jsonl")
    train, held_out = load_sft(sft_path, tok, max_length=16, eval_path=eval_path)
    assert (len(train), len(held_out)) == (3, 1)
    assert held_out.samples[0].where == f"{eval_path}:1"
    assert load_sft(sft_path, tok, max_length=16)[1] is None
    with pytest.raises(ValueError, match="not both"):
        load_sft(sft_path, tok, max_length=16, eval_path=eval_path, eval_fraction=0.5)
