"""The demo's task: "say good things about a topic", a word-level tokenizer, a hidden gold rule
that scores responses, and the config of the tiny Llama the demo trains from scratch.

Why this task. ``kernelrl demo`` runs SFT, a reward model, PPO, DPO and best-of-N on a CPU
in minutes, with a randomly initialised model of about 0.5M parameters and no pretrained
weights. The task must therefore be learnable from scratch in a couple of minutes, yet
leave a clear gap between imitating mixed-quality demonstrations (SFT) and optimising a
preference signal (RM + PPO, DPO, best-of-N). It must also depend on the prompt (the policy
has to read it) and resist degenerate hacks (repeating one good word, rambling on, stopping
at once).

Prompts. One of 16 topics in one of 8 phrasings, ending with " :" (the separator; the
trainers' plain format concatenates prompt and response verbatim, so responses start with a
space)::

    describe cats :            tell me about coffee :       write about trains :
    say something about rain : what is nice about books :   talk about space :
    give me words for winter : summer :

Every topic has six on-topic words (``TOPICS``), e.g. cats: fluffy purring whiskers curious
graceful paws. Other words: FILLER (very so and really quite truly always: neutral),
NEGATIVE (boring ugly awful broken sad dull nasty gross), the other topics' words
(off-topic), and the prompt words themselves (topic names, phrasing words, ":").

The gold rule, in words. Split the response on whitespace into n words. Each *distinct*
on-topic word earns 1 point (saying it again earns nothing more). Filler words are neutral.
Every other word (negative, another topic's word, a topic name, a prompt word, anything
unknown) costs 1 point each time it appears. Every repeat (an occurrence of a word already
used earlier in the response, whatever its kind) costs another half point. A good response
has 3 to 8 words; each word short of 3 or beyond 8 costs 1 point.

As a formula::

    gold(prompt, response) = U − B − 0.5·R − max(0, 3 − n) − max(0, n − 8)

    U  distinct on-topic words of the prompt's topic       (0 ≤ U ≤ 6)
    B  occurrences of words that are neither on-topic nor filler
    R  repeats: n − (number of distinct words)
    n  number of words

Scores are multiples of 0.5; the best possible is 6 (all six on-topic words, each once, plus
at most two fillers), e.g. "describe cats :" → " fluffy purring whiskers curious graceful
paws" scores 6. An empty response scores −3; "fluffy" ×8 scores 1 − 3.5 = −2.5; three
distinct fillers score 0; a random word salad is well below 0. The score depends on the
prompt through the topic: the same response is good for one topic and off-topic (negative)
for every other.

Mixed-quality data. The shipped data (``kernelrl/demo/data``, written by
``kernelrl.demo.make_data``) draws every response from a mixture of writers (``WRITERS``):

    good      20 %  4-8 words, distinct on-topic words (85 %) and filler         ≈ +4.8
    mediocre  40 %  2-9 words: on-topic 50 % (with repeats), filler 20 %,
                    off-topic 10 %, echoed prompt words 5 %, negative 15 %       ≈  0.0
    confused  15 %  a good answer about another topic (a topic drawn per
                    response): fluent, but every content word is off-topic       ≈ −4.9
    poor      25 %  1-10 words: on-topic 20 %, filler 20 %, off-topic 20 %,
                    echo 10 %, negative 30 %                                     ≈ −3.1

(last column: the writer's mean gold score). So the SFT policy imitates a mediocre average
and the preferences span the whole range. Measured on the shipped files: the SFT
demonstrations' mean gold score is −0.54 (sd 3.66); the rankings' (4 responses per
prompt, distinct scores) mean score by rank is +3.55, +0.60, −1.79, −4.40; the best
possible is +6. The confused writer is what makes the preferences
depend on the prompt: a bag-of-words scorer that sees the prompt's topic ranks held-out
pairs 95 % right, one blind to the prompt only 65 % (tests/demo/test_task.py). In design
runs (plain torch, 2 CPU threads) a reward model of ``model_config()`` trained from scratch
on preferences.jsonl reached 87-90 % held-out pairwise accuracy in 5-10 epochs (20-40 s);
an SFT policy scored about −1.4 on the held-out prompts, and 40 steps of a policy gradient on
the gold score with a KL penalty (15 s) or 2 epochs of DPO lifted it to about +2.0 and +1.4.

Public names: ``build_tokenizer``, ``save_tokenizer``, ``gold_score``, ``score_responses``,
``win_rate``, ``model_config``, ``prompt_topic``, ``make_prompt``, ``data_path`` and the
word lists. Scoring generations: decode with ``skip_special_tokens=True`` (special tokens
left in the text count as unknown words, −1 each). <pad>, <s> and <unk> never occur in the
data, so a policy pushed far (DPO for many epochs) can start emitting them mid-response,
where skipping hides them: forbid them when sampling.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path
from typing import Sequence

__all__ = [
    "TOPICS", "FILLER", "NEGATIVE", "TEMPLATES", "SEPARATOR", "SPECIALS", "VOCAB",
    "PROMPT_WORDS", "LENGTH_WINDOW", "MAX_SCORE", "WRITERS", "build_tokenizer", "save_tokenizer",
    "prompt_topic", "make_prompt", "gold_score", "score_responses", "win_rate",
    "model_config", "data_path",
]

# Topic -> its six on-topic words. No word belongs to two topics.
TOPICS: dict[str, tuple[str, ...]] = {
    "cats": ("fluffy", "purring", "whiskers", "curious", "graceful", "paws"),
    "dogs": ("loyal", "friendly", "barking", "fetch", "wagging", "puppy"),
    "ocean": ("waves", "salty", "tides", "coral", "deep", "blue"),
    "coffee": ("bitter", "aroma", "roasted", "espresso", "caffeine", "mug"),
    "forest": ("trees", "moss", "pine", "shady", "ferns", "woodland"),
    "music": ("melody", "rhythm", "harmony", "chords", "songs", "guitar"),
    "winter": ("snow", "frost", "icy", "snowflakes", "chilly", "sledding"),
    "city": ("streets", "skyscrapers", "traffic", "subway", "crowds", "lights"),
    "garden": ("flowers", "roses", "tulips", "seeds", "blooming", "soil"),
    "space": ("stars", "planets", "galaxy", "orbit", "rockets", "astronauts"),
    "bread": ("crusty", "baked", "flour", "yeast", "loaf", "dough"),
    "rain": ("drizzle", "puddles", "umbrella", "clouds", "wet", "thunder"),
    "mountains": ("peaks", "summit", "cliffs", "alpine", "hiking", "rocky"),
    "books": ("pages", "chapters", "stories", "authors", "library", "novels"),
    "summer": ("sunny", "beach", "sunshine", "warm", "vacation", "picnic"),
    "trains": ("tracks", "rails", "station", "locomotive", "carriages", "whistle"),
}
FILLER: tuple[str, ...] = ("very", "so", "and", "really", "quite", "truly", "always")
NEGATIVE: tuple[str, ...] = ("boring", "ugly", "awful", "broken", "sad", "dull", "nasty",
                             "gross")
SEPARATOR = ":"
# The eight phrasings of a prompt; {topic} is the topic's name.
TEMPLATES: tuple[str, ...] = (
    "describe {topic} :",
    "tell me about {topic} :",
    "write about {topic} :",
    "say something about {topic} :",
    "what is nice about {topic} :",
    "talk about {topic} :",
    "give me words for {topic} :",
    "{topic} :",
)
SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>")
PAD, UNK, BOS, EOS = SPECIALS

# A good response has LENGTH_WINDOW[0] .. LENGTH_WINDOW[1] words; the best score is 6.
LENGTH_WINDOW = (3, 8)
MAX_SCORE = 6.0

# The writers the shipped responses are drawn from (kernelrl.demo.make_data): the share of
# each writer in the mixture, the range of response lengths (words, inclusive), and the
# probabilities that a word is on-topic / filler / off-topic (another topic's word) / echo (a
# prompt word: a topic name, a phrasing word or ":") / negative. "unique": on-topic words are
# never repeated (otherwise they are drawn with replacement, so repeats happen). The
# "confused" writer answers a different topic than the prompt's (one drawn per response):
# its "on-topic" words belong to that topic, so for the prompt they are off-topic; it is
# what makes the preferences depend on the prompt (a scorer blind to the prompt would rank
# its fluent answers first, the gold rule ranks them last).
WRITERS: dict[str, dict] = {
    "good": {"share": 0.20, "length": (4, 8), "unique": True, "wrong_topic": False,
             "on": 0.85, "filler": 0.15, "off": 0.0, "echo": 0.0, "negative": 0.0},
    "mediocre": {"share": 0.40, "length": (2, 9), "unique": False, "wrong_topic": False,
                 "on": 0.50, "filler": 0.20, "off": 0.10, "echo": 0.05, "negative": 0.15},
    "confused": {"share": 0.15, "length": (4, 8), "unique": True, "wrong_topic": True,
                 "on": 0.85, "filler": 0.15, "off": 0.0, "echo": 0.0, "negative": 0.0},
    "poor": {"share": 0.25, "length": (1, 10), "unique": False, "wrong_topic": False,
             "on": 0.20, "filler": 0.20, "off": 0.20, "echo": 0.10, "negative": 0.30},
}

# Every word a prompt can contain: the phrasing words (":" among them), then the topic names.
PROMPT_WORDS: tuple[str, ...] = tuple(
    sorted({w for t in TEMPLATES for w in t.split() if w != "{topic}"}) + list(TOPICS))


def _vocabulary() -> dict[str, int]:
    words: list[str] = list(SPECIALS)
    for group in (PROMPT_WORDS, FILLER, NEGATIVE, [w for ws in TOPICS.values() for w in ws]):
        for word in group:
            if word not in words:
                words.append(word)
    return {w: i for i, w in enumerate(words)}


# Token string -> id: the specials first (pad 0, unk 1, bos 2, eos 3), then the prompt words,
# topic names, filler, negative and on-topic words.
VOCAB: dict[str, int] = _vocabulary()

_WORD_TOPIC = {w: t for t, ws in TOPICS.items() for w in ws}
_FILLER = frozenset(FILLER)


def _check_lists() -> None:
    on_topic = [w for ws in TOPICS.values() for w in ws]
    if len(on_topic) != len(set(on_topic)):
        raise AssertionError("TOPICS: a word belongs to two topics")
    clash = set(on_topic) & (set(FILLER) | set(NEGATIVE) | set(PROMPT_WORDS))
    clash |= set(FILLER + NEGATIVE) & set(PROMPT_WORDS)
    if clash or set(FILLER) & set(NEGATIVE):
        raise AssertionError(f"word lists overlap: {sorted(clash)}")


_check_lists()


# ---- tokenizer -------------------------------------------------------------------------------

def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``VOCAB`` (built in memory).

    Whitespace pre-tokenizer (words and runs of punctuation), unknown words map to <unk>;
    pad <pad>, bos <s>, eos </s>; no chat template, so the trainers use their plain format
    (BOS + prompt tokens + response tokens + EOS). Decoding joins tokens with single
    spaces, so a prompt or response decodes to ``" ".join(text.split())``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(VOCAB), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK,
                                   bos_token=BOS, eos_token=EOS,
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(folder) -> Path:
    """Save ``build_tokenizer()`` into ``folder`` (created) for the trainers to load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(folder)
    return folder


# ---- the gold rule ---------------------------------------------------------------------------

def prompt_topic(prompt: str) -> str:
    """The topic a prompt names (its only topic-name word); ValueError if not exactly one."""
    found = {w for w in prompt.split() if w in TOPICS}
    if len(found) != 1:
        raise ValueError(f"prompt: expected exactly one topic name ({', '.join(TOPICS)}), "
                         f"got {prompt!r}")
    return found.pop()


def make_prompt(topic: str, template: int = 0) -> str:
    """The prompt for ``topic`` in phrasing ``TEMPLATES[template]``."""
    if topic not in TOPICS:
        raise ValueError(f"topic: expected one of {', '.join(TOPICS)}, got {topic!r}")
    return TEMPLATES[template].format(topic=topic)


def gold_score(prompt: str, response: str) -> float:
    """The hidden gold rule (module docstring): U − B − 0.5·R − length penalty.

    ``response`` is plain text (decode generations with ``skip_special_tokens=True``);
    it is split on whitespace, so a leading space or decoding's spacing does not matter.
    """
    topic = prompt_topic(prompt)
    words = response.split()
    seen: set[str] = set()
    score = 0.0
    for word in words:
        repeat = word in seen
        seen.add(word)
        if repeat:
            score -= 0.5
        if _WORD_TOPIC.get(word) == topic:
            score += 0.0 if repeat else 1.0
        elif word not in _FILLER:
            score -= 1.0
    low, high = LENGTH_WINDOW
    n = len(words)
    return score - max(0, low - n) - max(0, n - high)


def score_responses(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """``gold_score`` of each (prompt, response) pair."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses: expected equal lengths, got {len(prompts)} "
                         f"and {len(responses)}")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """The fraction of pairs (a_i, b_i) where a wins (a_i > b_i); ties count half."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"scores_a and scores_b: expected equal lengths, got {len(scores_a)} "
                         f"and {len(scores_b)}")
    if not scores_a:
        raise ValueError("scores_a and scores_b: empty")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b))
    return wins / len(scores_a)


# ---- the model -------------------------------------------------------------------------------

# hidden, layers, heads, MLP width. default: 529,792 parameters; small: 100,928.
_SIZES = {
    "default": (128, 3, 4, 256),
    "small": (64, 2, 4, 128),
}


def model_config(size: str = "default"):
    """The ``LlamaConfig`` of the demo policy (and reward model): vocab = ``VOCAB``.

    "default" (hidden 128, 3 layers, 4 heads, MLP 256: 0.53M parameters) for
    ``kernelrl demo``; "small" (hidden 64, 2 layers, 4 heads, MLP 128: 0.10M) for
    the CI run of the whole pipeline. Untied embeddings (the log-prob path wants a plain
    lm_head), 64 positions (prompts are at most 7 tokens, good responses at most 9).
    """
    from transformers import LlamaConfig

    if size not in _SIZES:
        raise ValueError(f"size: expected one of {', '.join(_SIZES)}, got {size!r}")
    hidden, layers, heads, mlp = _SIZES[size]
    return LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=mlp,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=VOCAB[BOS],
                       eos_token_id=VOCAB[EOS], pad_token_id=VOCAB[PAD])


# ---- shipped data ----------------------------------------------------------------------------

_EXTRACTED = contextlib.ExitStack()
atexit.register(_EXTRACTED.close)


def data_path(name: str) -> Path:
    """The path of a shipped data file (``kernelrl/demo/data/<name>``), e.g. "sft.jsonl".

    Uses ``importlib.resources``, so it works from a checkout, an editable install and an
    installed wheel (from a zip it is extracted to a temporary file for the process's life).
    """
    resource = resources.files("kernelrl.demo").joinpath("data", name)
    if not resource.is_file():
        raise FileNotFoundError(f"kernelrl.demo: no shipped data file {name!r}")
    if isinstance(resource, Path):
        return resource
    return Path(_EXTRACTED.enter_context(resources.as_file(resource)))
