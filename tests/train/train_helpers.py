"""Tiny, offline building blocks for the trainer tests: a word-level tokenizer, a random
2-layer Llama saved the way ``save_pretrained`` saves a real model, and SFT data.

Nothing here downloads anything: the tokenizer is built in memory with ``tokenizers`` and
wrapped in a ``PreTrainedTokenizerFast``; the model comes from a ``LlamaConfig``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
NUMBERS = "zero one two three four five six seven eight nine".split()
WORDS = NUMBERS + "what is after before count from to then a b c d e f :".split()
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB (split on whitespace), no chat template: the
    data layer then uses its plain format (BOS, prompt, response, EOS)."""
    model = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(vocab_size: int = len(VOCAB)) -> LlamaConfig:
    """A Llama small enough that a training step takes milliseconds on a CPU:
    H = 32, 2 layers, 4 heads (2 KV heads), MLP width 64."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, tie_word_embeddings=False,
                       bos_token_id=VOCAB["<s>"], eos_token_id=VOCAB["</s>"],
                       pad_token_id=VOCAB["<pad>"])


def write_model_folder(folder, seed: int = 0) -> Path:
    """A random tiny Llama and the tokenizer, saved with ``save_pretrained`` into ``folder``
    (config.json, model.safetensors, tokenizer files)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def sft_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/response pairs of a learnable task: "count from X to Y" is answered
    with the numbers from X to Y. Lengths vary (2 to 7 response words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, 5)
        stop = start + rng.randrange(1, 5)
        prompt = f"count from {NUMBERS[start]} to {NUMBERS[stop]} :"
        response = " " + " ".join(NUMBERS[start:stop + 1])
        out.append({"prompt": prompt, "response": response})
    return out


def write_jsonl(path, rows) -> Path:
    """Write rows (dicts, or raw strings written verbatim) as a JSONL file."""
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): to check nothing changed."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}
