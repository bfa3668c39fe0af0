"""Writes the demo's shipped data (``kernelrl/demo/data``) from one seed, byte for byte.

    python -m kernelrl.demo.make_data             # rewrite kernelrl/demo/data
    python -m kernelrl.demo.make_data --out DIR   # write elsewhere (the test compares bytes)

The files (JSONL, one object per line, keys in the order shown, ASCII, "\\n" line ends):

    sft.jsonl                  2000 {"prompt", "response"}   demonstrations
    preferences.jsonl           640 {"prompt", "responses"}  K = 4 best first (3840 pairs)
    heldout_preferences.jsonl   160 {"prompt", "responses"}  the same on held-out prompts
    prompts.jsonl               512 {"prompt"}               for PPO/GRPO/best-of-N
    heldout_prompts.jsonl        32 {"prompt"}               every held-out prompt once

Prompts (``kernelrl.demo.task``): 16 topics × 8 phrasings = 128 prompts. Topic number i
(in ``TOPICS`` order) holds out phrasings i mod 8 and (i + 3) mod 8: 32 held-out prompts,
two per topic and four per phrasing, so every topic and every phrasing is trained on, and
the held-out prompts are new combinations of both. The other 96 are the training prompts;
sft, preferences and prompts use only those, heldout_* only held-out ones.

Responses come from the writer mixture ``task.WRITERS``: a writer is drawn by its share
(good 20 %, mediocre 40 %, confused 15 %, poor 25 %), then (confused only) the topic it
answers, another than the prompt's, then a length uniformly in its range, then each word
independently by category (on-topic / filler / off-topic / echo / negative). On-topic words
are drawn with replacement (repeats happen) except by the good and confused writers, which
never repeat one (after all six, "on-topic" draws become filler). An off-topic word is a
word of another topic drawn uniformly; an echo word is one of ``task.PROMPT_WORDS``
(parroting the prompt; it also puts every prompt word into some responses, so the reward
model and DPO see those words penalised rather than never). A response is " " + the words
joined by single spaces (the trainers concatenate prompt and response verbatim).

Rankings: for a prompt, responses are drawn from the mixture until four have four different
gold scores (a draw whose score is already taken is discarded, so no ranking has a tie and
every pair has a strict gold preference); they are listed from the highest score down.

Prompts are drawn uniformly from the training prompts (sft, preferences, prompts) or the
held-out prompts (heldout_preferences), all from one ``random.Random(SEED)`` in the order
above, so the files depend on nothing but this module and ``task``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from kernelrl.demo import task

__all__ = ["SEED", "SIZES", "RANKING_K", "FILES", "split_prompts", "sample_response",
           "sample_ranking", "generate", "write_data", "default_folder", "main"]

SEED = 0
RANKING_K = 4
SIZES = {"sft.jsonl": 2000, "preferences.jsonl": 640, "heldout_preferences.jsonl": 160,
         "prompts.jsonl": 512, "heldout_prompts.jsonl": 32}
FILES = tuple(SIZES)

# Give up on a ranking after this many draws (never reached with the shipped writers).
_MAX_DRAWS = 1000


def split_prompts() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), each in topic order then phrasing order."""
    train, held_out = [], []
    n = len(task.TEMPLATES)
    for i, topic in enumerate(task.TOPICS):
        hold = {i % n, (i + 3) % n}
        for j in range(n):
            (held_out if j in hold else train).append(task.make_prompt(topic, j))
    return train, held_out


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    """A key of ``weights`` drawn with probability proportional to its value."""
    x = rng.random() * sum(weights.values())
    for key, weight in weights.items():
        x -= weight
        if x < 0:
            return key
    return next(k for k, w in reversed(weights.items()) if w > 0)


def sample_response(rng: random.Random, topic: str) -> str:
    """One response to a prompt on ``topic`` from the writer mixture (module docstring)."""
    writer = task.WRITERS[_pick(rng, {k: w["share"] for k, w in task.WRITERS.items()})]
    low, high = writer["length"]
    length = rng.randint(low, high)
    if writer["wrong_topic"]:
        topic = rng.choice([t for t in task.TOPICS if t != topic])
    on_topic = list(task.TOPICS[topic])
    others = [t for t in task.TOPICS if t != topic]
    unique = writer["unique"]
    categories = {c: writer[c] for c in ("on", "filler", "off", "echo", "negative")}
    words = []
    for _ in range(length):
        category = _pick(rng, categories)
        if category == "on" and unique and not on_topic:
            category = "filler"
        if category == "on":
            word = rng.choice(on_topic)
            if unique:
                on_topic.remove(word)
        elif category == "filler":
            word = rng.choice(task.FILLER)
        elif category == "off":
            word = rng.choice(task.TOPICS[rng.choice(others)])
        elif category == "echo":
            word = rng.choice(task.PROMPT_WORDS)
        else:
            word = rng.choice(task.NEGATIVE)
        words.append(word)
    return " " + " ".join(words)


def sample_ranking(rng: random.Random, prompt: str, k: int = RANKING_K) -> list[str]:
    """``k`` responses with ``k`` different gold scores, best first."""
    topic = task.prompt_topic(prompt)
    by_score: dict[float, str] = {}
    for _ in range(_MAX_DRAWS):
        response = sample_response(rng, topic)
        by_score.setdefault(task.gold_score(prompt, response), response)
        if len(by_score) == k:
            return [by_score[s] for s in sorted(by_score, reverse=True)]
    raise RuntimeError(f"no {k} responses with different gold scores for {prompt!r} "
                       f"in {_MAX_DRAWS} draws")


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """The records of every shipped file, by file name."""
    rng = random.Random(seed)
    train, held_out = split_prompts()
    out: dict[str, list[dict]] = {}
    sft = []
    for _ in range(SIZES["sft.jsonl"]):
        prompt = rng.choice(train)
        sft.append({"prompt": prompt, "response": sample_response(rng, task.prompt_topic(prompt))})
    out["sft.jsonl"] = sft
    for name, prompts in (("preferences.jsonl", train), ("heldout_preferences.jsonl", held_out)):
        rows = []
        for _ in range(SIZES[name]):
            prompt = rng.choice(prompts)
            rows.append({"prompt": prompt, "responses": sample_ranking(rng, prompt)})
        out[name] = rows
    out["prompts.jsonl"] = [{"prompt": rng.choice(train)} for _ in range(SIZES["prompts.jsonl"])]
    out["heldout_prompts.jsonl"] = [{"prompt": p} for p in held_out]
    return out


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows).encode("ascii")


def default_folder() -> Path:
    """``kernelrl/demo/data`` next to this module (where the shipped files live)."""
    return Path(__file__).resolve().parent / "data"


def write_data(folder=None, seed: int = SEED) -> dict[str, Path]:
    """Write every file into ``folder`` (default: the package's data folder); their paths."""
    folder = default_folder() if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in generate(seed).items():
        path = folder / name
        path.write_bytes(_jsonl(rows))
        paths[name] = path
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernelrl.demo.make_data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="folder to write into (default: kernelrl/demo/data)")
    args = parser.parse_args(argv)
    for name, path in write_data(args.out).items():
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
