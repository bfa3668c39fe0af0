"""Training data for the SFT, reward-model and DPO trainers: JSONL files in, token ids out.

Files are JSONL, one example per line; blank lines are skipped. Fields beyond the ones
below are ignored. A malformed line is a ValueError naming the file and the line, e.g.
``data.jsonl:7: "chosen" must be a string, got number``.

    SFT          {"prompt": P, "response": str}
                 {"messages": [{"role": str, "content": str}, ...]}
    RM and DPO   {"prompt": P, "chosen": str, "rejected": str}
                 {"prompt": P, "responses": [best, ..., worst]}      (a ranking, K >= 2)

P is a string or a list of messages (the conversation so far). In ``messages`` the first
message must not be the assistant's and the last must be; the loss is on the content of
every assistant message. A chosen/rejected pair is the ranking [chosen, rejected].

Rankings (InstructGPT, Ouyang et al. 2022): a prompt with K ranked responses gives all
C(K, 2) ordered pairs (better, worse) = (i, j) for i < j, ``ranking_pairs(K)``; each
response is tokenized once and becomes one sequence (K sequences, not 2·C(K, 2)).

Formatting. With ``use_chat_template`` (the default) and a tokenizer that has a chat
template, a string prompt becomes one user message and the text is
``tokenizer.apply_chat_template(..., tokenize=False)``, tokenized without added special
tokens (the template writes BOS itself where the model wants it). A response is what the
template adds after the generation prompt, trailing whitespace stripped. Otherwise the
plain fallback: a string prompt and its response are concatenated verbatim (put your own
separator in the data), and messages render as ``"{role}: {content}\\n"`` each, with
``"assistant: "`` as the generation prompt; the plain format starts with the tokenizer's
BOS when it has one. Either way a final response ends with EOS: appended unless the text
already ends with ``tokenizer.eos_token``.

Tokenization is by pieces: the prompt (the generation prompt included) and each response
are tokenized separately and concatenated, so the prompt tokens are exactly those a
generation from that prompt would see, and are the same for all K responses. Multi-turn
``messages`` are tokenized turn by turn the same way, which needs a template that renders
each conversation prefix as a prefix of the longer conversation (a ValueError otherwise).

Labels are the input ids on response (assistant) tokens and -100 (``IGNORE_INDEX``) on
prompt tokens, padding, and the first token of every sequence (nothing predicts it; in a
packed row it would be predicted by the previous example). Labels are aligned with the
inputs (the Hugging Face convention): the loss shifts them, logits[:, t] against
labels[:, t + 1].

Over ``max_length`` (prompt + response tokens), by ``overlong``:
    "truncate"  the prompt gives up its oldest tokens first (after a leading BOS, which
                stays) but keeps at least its last ``keep_prompt_tokens`` (default
                max_length // 2); whatever is still over comes off the end of the
                response (its EOS goes first). One prompt cut is shared by all K responses.
                (For a multi-turn conversation "prompt" is everything before the first
                assistant token, "response" everything from there on.) With
                keep_prompt_tokens < max_length every response keeps at least one token;
                with keep_prompt_tokens = max_length a prompt of max_length tokens or more
                leaves no room, and its responses are dropped.
    "drop"      the sequence is dropped (for preferences: that response, with its pairs).
A response left with no tokens, or an SFT sample left with no label, is dropped; a dropped
response takes its pairs with it, and an example left without a pair is dropped.
``DataStats`` counts all of it for the trainer to log.

Held-out data: ``eval_path`` (a second file), or ``eval_fraction`` of the lines, picked
by ``seed`` (the same seed and file give the same split).

Batching, packing and the resumable sampler are in ``kernelrl.train.batching``.

Shapes (here): K responses per prompt; lengths are in tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "IGNORE_INDEX", "OVERLONG", "SFTRecord", "PreferenceRecord", "DataStats", "SFTSample",
    "PreferenceSample", "SFTDataset", "PreferenceDataset", "read_jsonl", "parse_sft_record",
    "parse_preference_record", "read_sft", "read_preferences", "ranking_pairs",
    "split_records", "tokenize_sft", "tokenize_preferences", "load_sft", "load_preferences",
]

IGNORE_INDEX = -100
OVERLONG = ("truncate", "drop")


# ---------------------------------------------------------------------------------------
# Records: one parsed JSONL line

@dataclass
class SFTRecord:
    """One SFT line: either ``prompt`` + ``response`` or ``messages``."""
    where: str                                  # "file:line"
    prompt: str | list[dict] | None = None
    response: str | None = None
    messages: list[dict] | None = None


@dataclass
class PreferenceRecord:
    """One RM/DPO line: a prompt and its K >= 2 responses, best first."""
    where: str
    prompt: str | list[dict]
    responses: list[str]


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(
        type(value), type(value).__name__)


def read_jsonl(path) -> list[tuple[str, dict]]:
    """The JSON objects of a JSONL file as ("file:line", object), blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    out = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {_json_type(obj)}")
            out.append((where, obj))
    if not out:
        raise ValueError(f"{path}: no examples (the file is empty or only has blank lines)")
    return out


def _string(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise ValueError(f'{where}: missing "{key}"')
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f'{where}: "{key}" must be a string, got {_json_type(value)}')
    return value


def _messages(value, key: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        got = "an empty array" if value == [] else _json_type(value)
        raise ValueError(f'{where}: "{key}" must be a non-empty array of '
                         f'{{"role", "content"}} objects, got {got}')
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f'{where}: "{key}"[{i}] must be an object, got {_json_type(message)}')
        for name in ("role", "content"):
            _string(message, name, f'{where}: "{key}"[{i}]')
    return value


def _prompt(obj: dict, where: str) -> str | list[dict]:
    if "prompt" not in obj:
        raise ValueError(f'{where}: missing "prompt"')
    if isinstance(obj["prompt"], list):
        return _messages(obj["prompt"], "prompt", where)
    return _string(obj, "prompt", where)


def parse_sft_record(obj: dict, where: str) -> SFTRecord:
    has_messages = "messages" in obj
    has_pair = "prompt" in obj or "response" in obj
    if has_messages and has_pair:
        raise ValueError(f'{where}: has both "messages" and "prompt"/"response"; use one format')
    if has_messages:
        messages = _messages(obj["messages"], "messages", where)
        if messages[0]["role"] == "assistant":
            raise ValueError(f'{where}: "messages" starts with an assistant message; '
                             f'there is no prompt before it')
        if messages[-1]["role"] != "assistant":
            raise ValueError(f'{where}: "messages" must end with an assistant message '
                             f'(the loss is on assistant content), got role '
                             f'{messages[-1]["role"]!r}')
        return SFTRecord(where, messages=messages)
    if not has_pair:
        raise ValueError(f'{where}: expected {{"prompt", "response"}} or {{"messages"}}, '
                         f'got keys {sorted(obj)}')
    return SFTRecord(where, prompt=_prompt(obj, where), response=_string(obj, "response", where))


def parse_preference_record(obj: dict, where: str) -> PreferenceRecord:
    prompt = _prompt(obj, where)
    has_pair = "chosen" in obj or "rejected" in obj
    has_ranking = "responses" in obj
    if has_pair and has_ranking:
        raise ValueError(f'{where}: has both "chosen"/"rejected" and "responses"; use one format')
    if has_pair:
        return PreferenceRecord(where, prompt, [_string(obj, "chosen", where),
                                                _string(obj, "rejected", where)])
    if not has_ranking:
        raise ValueError(f'{where}: expected "chosen" and "rejected", or a ranking '
                         f'"responses": [best, ..., worst]; got keys {sorted(obj)}')
    ranking = obj["responses"]
    if not isinstance(ranking, list):
        raise ValueError(f'{where}: "responses" must be an array of strings, got '
                         f'{_json_type(ranking)}')
    if not ranking:
        raise ValueError(f'{where}: "responses" is an empty ranking')
    if len(ranking) < 2:
        raise ValueError(f'{where}: a ranking needs K >= 2 responses, got K = {len(ranking)}')
    for i, response in enumerate(ranking):
        if not isinstance(response, str):
            raise ValueError(f'{where}: "responses"[{i}] must be a string, got '
                             f'{_json_type(response)}')
    return PreferenceRecord(where, prompt, list(ranking))


def read_sft(path) -> list[SFTRecord]:
    return [parse_sft_record(obj, where) for where, obj in read_jsonl(path)]


def read_preferences(path) -> list[PreferenceRecord]:
    return [parse_preference_record(obj, where) for where, obj in read_jsonl(path)]


def ranking_pairs(k: int) -> list[tuple[int, int]]:
    """All C(k, 2) ordered pairs (better, worse) of a ranking best-first: (i, j), i < j."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def split_records(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): round(eval_fraction · n) records (at least one) picked by ``seed``.

    Both keep the file order. The same seed and records always give the same split.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: expected a value in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(records), []
    n_eval = max(1, round(eval_fraction * len(records)))
    if n_eval >= len(records):
        raise ValueError(f"eval_fraction: {eval_fraction} of {len(records)} examples leaves "
                         f"none to train on")
    picked = set(random.Random(seed).sample(range(len(records)), n_eval))
    train = [r for i, r in enumerate(records) if i not in picked]
    held_out = [r for i, r in enumerate(records) if i in picked]
    return train, held_out


# ---------------------------------------------------------------------------------------
# Tokenized samples and their datasets

@dataclass
class DataStats:
    """What loading did to the data; ``as_dict()`` for the trainer's log."""
    examples: int = 0        # records read
    kept: int = 0            # samples produced
    truncated: int = 0       # kept samples that lost tokens to max_length
    dropped: int = 0         # records that produced no sample
    pairs: int = 0           # preference pairs kept
    pairs_dropped: int = 0   # preference pairs lost (with a dropped response or record)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SFTSample:
    input_ids: list[int]
    labels: list[int]        # IGNORE_INDEX off the response tokens
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferenceSample:
    """One prompt, its responses (best first) and the pairs among them.

    Sequence k is ``prompt_ids + responses[k]``. ``pairs`` are (better, worse) indices into
    ``responses``; after drops they need not be all C(K, 2) of the original ranking.
    """
    prompt_ids: list[int]
    responses: list[list[int]]
    pairs: list[tuple[int, int]]
    where: str = ""

    def __len__(self) -> int:
        """Tokens of the longest sequence (its padded length)."""
        return len(self.prompt_ids) + max(len(r) for r in self.responses)


@dataclass
class SFTDataset:
    samples: list[SFTSample]
    stats: DataStats
    pad_token_id: int
    max_length: int

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> SFTSample:
        return self.samples[i]

    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]


@dataclass
class PreferenceDataset:
    samples: list[PreferenceSample]
    stats: DataStats
    pad_token_id: int
    max_length: int

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> PreferenceSample:
        return self.samples[i]

    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]


# ---------------------------------------------------------------------------------------
# Formatting and tokenization

class _Formatter:
    """Renders prompts and responses (chat template or plain) and tokenizes the pieces."""

    def __init__(self, tokenizer, use_chat_template: bool):
        self.tokenizer = tokenizer
        self.template = bool(use_chat_template) and bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no eos_token; every response must end with EOS")
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token
        self.bos_id = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def plain_start(self) -> list[int]:
        return [] if self.template or self.bos_id is None else [self.bos_id]

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + "assistant: " if generation_prompt else text

    def final_reply(self, text: str) -> list[int]:
        """A last response's ids, ending with EOS."""
        ids = self.encode(text)
        return ids if text.endswith(self.eos_text) else ids + [self.eos_id]

    def prompt(self, prompt: str | list[dict]) -> tuple[str, list[dict] | None]:
        """(prompt text, its messages or None for a verbatim string prompt)."""
        if isinstance(prompt, str) and not self.template:
            return prompt, None
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.render(messages, True), messages

    def reply_text(self, prompt_text: str, messages: list[dict] | None, response: str,
                   where: str) -> str:
        if messages is None:
            return response
        full = self.render(messages + [{"role": "assistant", "content": response}], False)
        if not full.startswith(prompt_text):
            raise ValueError(f"{where}: the chat template does not render the prompt with its "
                             f"generation prompt as a prefix of the prompt with its response")
        return full[len(prompt_text):].rstrip()

    def conversation(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation, labels on every assistant message."""
        ids = self.plain_start()
        labels = [IGNORE_INDEX] * len(ids)
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.render(messages[:i], True)
            turn = self.render(messages[:i + 1], False)
            if not (head.startswith(done) and turn.startswith(head)):
                raise ValueError(f"{where}: the chat template does not render this conversation "
                                 f"turn by turn (message {i}: an earlier rendering is not a "
                                 f"prefix of a later one)")
            prompt_ids = self.encode(head[len(done):])
            reply = turn[len(head):]
            reply_ids = self.final_reply(reply.rstrip()) if i == len(messages) - 1 \
                else self.encode(reply)
            ids += prompt_ids + reply_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids
            done = turn
        return ids, labels


def _cut_plan(n_prompt: int, n_reply: int, max_length: int, keep_prompt: int,
              keep_first: int) -> tuple[int, int]:
    """(prompt tokens to remove after the first ``keep_first``, reply tokens to keep)."""
    excess = n_prompt + n_reply - max_length
    if excess <= 0:
        return 0, n_reply
    removable = max(0, n_prompt - max(keep_prompt, keep_first))
    from_prompt = min(excess, removable)
    return from_prompt, max(0, n_reply - (excess - from_prompt))


def _check_options(max_length: int, overlong: str, keep_prompt_tokens: int | None) -> int:
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong: expected one of {OVERLONG}, got {overlong!r}")
    if keep_prompt_tokens is None:
        return max_length // 2
    if not isinstance(keep_prompt_tokens, int) or not 0 <= keep_prompt_tokens <= max_length:
        raise ValueError(f"keep_prompt_tokens: expected an int in [0, max_length], "
                         f"got {keep_prompt_tokens!r}")
    return keep_prompt_tokens


def tokenize_sft(records: list[SFTRecord], tokenizer, *, max_length: int,
                 overlong: str = "truncate", keep_prompt_tokens: int | None = None,
                 use_chat_template: bool = True) -> SFTDataset:
    keep_prompt = _check_options(max_length, overlong, keep_prompt_tokens)
    fmt = _Formatter(tokenizer, use_chat_template)
    stats = DataStats(examples=len(records))
    samples = []
    for record in records:
        if record.messages is not None:
            ids, labels = fmt.conversation(record.messages, record.where)
        else:
            prompt_text, messages = fmt.prompt(record.prompt)
            prompt_ids = fmt.plain_start() + fmt.encode(prompt_text)
            reply = fmt.final_reply(fmt.reply_text(prompt_text, messages, record.response,
                                                   record.where))
            ids = prompt_ids + reply
            labels = [IGNORE_INDEX] * len(prompt_ids) + reply
        truncated = len(ids) > max_length
        if truncated and overlong == "drop":
            stats.dropped += 1
            continue
        if truncated:
            n_prompt = next((t for t, y in enumerate(labels) if y != IGNORE_INDEX), len(ids))
            keep_first = 1 if n_prompt and ids[0] == fmt.bos_id else 0
            cut, keep = _cut_plan(n_prompt, len(ids) - n_prompt, max_length, keep_prompt,
                                  keep_first)
            ids = ids[:keep_first] + ids[keep_first + cut:n_prompt + keep]
            labels = labels[:keep_first] + labels[keep_first + cut:n_prompt + keep]
        labels[0] = IGNORE_INDEX
        if all(y == IGNORE_INDEX for y in labels):
            stats.dropped += 1
            continue
        stats.kept += 1
        stats.truncated += truncated
        samples.append(SFTSample(ids, labels, record.where))
    return SFTDataset(samples, stats, fmt.pad_id, max_length)


def tokenize_preferences(records: list[PreferenceRecord], tokenizer, *, max_length: int,
                         overlong: str = "truncate", keep_prompt_tokens: int | None = None,
                         use_chat_template: bool = True) -> PreferenceDataset:
    keep_prompt = _check_options(max_length, overlong, keep_prompt_tokens)
    fmt = _Formatter(tokenizer, use_chat_template)
    stats = DataStats(examples=len(records))
    samples = []
    for record in records:
        prompt_text, messages = fmt.prompt(record.prompt)
        prompt_ids = fmt.plain_start() + fmt.encode(prompt_text)
        replies = [fmt.final_reply(fmt.reply_text(prompt_text, messages, r, record.where))
                   for r in record.responses]
        all_pairs = ranking_pairs(len(replies))
        longest = max(len(r) for r in replies)
        truncated = len(prompt_ids) + longest > max_length
        if overlong == "drop":
            keep = [len(prompt_ids) + len(r) <= max_length for r in replies]
        else:
            keep_first = 1 if prompt_ids and prompt_ids[0] == fmt.bos_id else 0
            cut, _ = _cut_plan(len(prompt_ids), longest, max_length, keep_prompt, keep_first)
            prompt_ids = prompt_ids[:keep_first] + prompt_ids[keep_first + cut:]
            room = max_length - len(prompt_ids)
            replies = [r[:room] for r in replies]
            keep = [len(r) > 0 for r in replies]
        new_index = {}
        for k, kept in enumerate(keep):
            if kept:
                new_index[k] = len(new_index)
        pairs = [(new_index[i], new_index[j]) for i, j in all_pairs
                 if i in new_index and j in new_index]
        if not pairs:
            stats.dropped += 1
            stats.pairs_dropped += len(all_pairs)
            continue
        stats.kept += 1
        stats.truncated += truncated and overlong == "truncate"
        stats.pairs += len(pairs)
        stats.pairs_dropped += len(all_pairs) - len(pairs)
        samples.append(PreferenceSample(prompt_ids, [r for r, k in zip(replies, keep) if k],
                                        pairs, record.where))
    return PreferenceDataset(samples, stats, fmt.pad_id, max_length)


def _load(read, tokenize, path, tokenizer, eval_path, eval_fraction, seed, options):
    if eval_path is not None and eval_fraction:
        raise ValueError("eval_path and eval_fraction: give one or the other, not both")
    records = read(path)
    if eval_path is not None:
        held_out = read(eval_path)
    else:
        records, held_out = split_records(records, eval_fraction, seed)
    train = tokenize(records, tokenizer, **options)
    held_out = tokenize(held_out, tokenizer, **options) if held_out else None
    for name, data in (("train", train), ("eval", held_out)):
        if data is not None and not data.samples:
            raise ValueError(f"{path if name == 'train' or eval_path is None else eval_path}: "
                             f"no {name} example left after tokenization "
                             f"(stats: {data.stats.as_dict()})")
    return train, held_out


def load_sft(path, tokenizer, *, max_length: int, overlong: str = "truncate",
             keep_prompt_tokens: int | None = None, use_chat_template: bool = True,
             eval_path=None, eval_fraction: float = 0.0,
             seed: int = 0) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, eval or None) from an SFT JSONL file; eval from ``eval_path`` or a split."""
    options = dict(max_length=max_length, overlong=overlong,
                   keep_prompt_tokens=keep_prompt_tokens, use_chat_template=use_chat_template)
    return _load(read_sft, tokenize_sft, path, tokenizer, eval_path, eval_fraction, seed,
                 options)


def load_preferences(path, tokenizer, *, max_length: int, overlong: str = "truncate",
                     keep_prompt_tokens: int | None = None, use_chat_template: bool = True,
                     eval_path=None, eval_fraction: float = 0.0,
                     seed: int = 0) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """(train, eval or None) from a RM/DPO JSONL file; eval from ``eval_path`` or a split."""
    options = dict(max_length=max_length, overlong=overlong,
                   keep_prompt_tokens=keep_prompt_tokens, use_chat_template=use_chat_template)
    return _load(read_preferences, tokenize_preferences, path, tokenizer, eval_path,
                 eval_fraction, seed, options)
