"""Tiny, offline building blocks for the trainer tests: a word-level tokenizer, a random
2-layer Llama saved the way ``save_pretrained`` saves a real model, SFT data, and what
every trainer's tests use: the ``one_thread`` and ``model_dir`` fixtures (import them into
a test module to use them there), command lines and configs, bitwise comparison, and
patching a trainer's function to fail or return NaN from its n-th call on.

Nothing here downloads anything: the tokenizer is built in memory with ``tokenizers`` and
wrapped in a ``PreTrainedTokenizerFast``; the model comes from a ``LlamaConfig`` (or, for
the mixture-of-experts tests, a ``MixtralConfig``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM,
                          PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM)

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


def tiny_mixtral_config(vocab_size: int = len(VOCAB), **changes) -> MixtralConfig:
    """A mixture-of-experts model as small as ``tiny_config``'s Llama: H = 32, 2 layers,
    4 heads (2 KV heads), 4 experts of width 16, top-2; ``changes`` override fields."""
    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=16,
                    num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=False, bos_token_id=VOCAB["<s>"],
                    eos_token_id=VOCAB["</s>"], pad_token_id=VOCAB["<pad>"])
    return MixtralConfig(**(settings | changes))


def write_mixtral_folder(folder, seed: int = 0, **changes) -> Path:
    """A random tiny Mixtral (``tiny_mixtral_config(**changes)``) and the tokenizer, saved
    with ``save_pretrained`` into ``folder``."""
    torch.manual_seed(seed)
    return _write_folder(folder, MixtralForCausalLM(tiny_mixtral_config(**changes)))


def write_qwen3_moe_folder(folder, seed: int = 0) -> Path:
    """A random tiny Qwen3-MoE (H = 32, 2 layers, 8 experts of width 16, top-4 without
    renormalising the weights, ``norm_topk_prob=False``) and the tokenizer."""
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                         moe_intermediate_size=16, num_experts=8, num_experts_per_tok=4,
                         norm_topk_prob=False, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         router_aux_loss_coef=0.01, tie_word_embeddings=False,
                         bos_token_id=VOCAB["<s>"], eos_token_id=VOCAB["</s>"],
                         pad_token_id=VOCAB["<pad>"])
    return _write_folder(folder, Qwen3MoeForCausalLM(cfg))


def _write_folder(folder, model) -> Path:
    folder = Path(folder)
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


# ----------------------------------------------------------------------------------------
# What the trainers' tests share


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (subprocesses get OMP_NUM_THREADS=1 too): on a shared, busy
    machine two threads waiting on each other make tiny steps very slow, and the bitwise
    comparisons need the same thread count in every run they pair."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model folder with its tokenizer (``write_model_folder``, seed 0)."""
    return write_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def cli_args(model, data, out, *extra, **settings) -> list[str]:
    """A trainer's command line: ``--model``, ``--data``, ``--out``, then ``settings`` as
    flags (``lr=1e-2`` -> ``--lr 1e-2``), then ``extra`` verbatim (a later flag wins)."""
    args = ["--model", str(model), "--data", str(data), "--out", str(out)]
    for name, value in settings.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return args + [str(x) for x in extra]


def make_config(cls, model, data, out, **settings):
    """A trainer config ``cls`` with the three required paths and ``settings``."""
    return cls(model=str(model), data=str(data), out=str(out), **settings)


@dataclass
class Runs:
    """One trainer's runs on the tiny model, as a test module makes them: command lines
    (``args``) and configs (``cfg``) with the module's ``settings``. ``data``: the
    training file, or several by name (the first is the default); a run may name one or
    pass another path."""

    config: type            # the trainer's config class
    model: Path
    data: Path | dict[str, Path]
    settings: dict

    def path(self, data: str | Path | None = None) -> Path:
        """The training file: ``data`` if it is a path, else the one it names, else the
        default."""
        if isinstance(data, Path):
            return data
        if isinstance(self.data, dict):
            return self.data[data] if data is not None else next(iter(self.data.values()))
        return self.data

    def args(self, out, *extra, data: str | Path | None = None) -> list[str]:
        """``cli_args`` for a run into ``out`` (``extra`` flags last, so they win)."""
        return cli_args(self.model, self.path(data), out, *extra, **self.settings)

    def cfg(self, out, data: str | Path | None = None, **changes):
        """The config of a run into ``out``: the module's settings, then ``changes``."""
        return make_config(self.config, self.model, self.path(data), out,
                           **(self.settings | changes))


def run_records(run_dir, total_steps: int, keys) -> tuple[list[dict], list[dict]]:
    """(every record, the training records) of a fresh run's metrics.jsonl, after
    checking that the first is step 0 (the data statistics) and that steps 1..S each have
    one training record (a ``loss``) holding every one of ``keys``."""
    from kernelrl.train.metrics import read_metrics

    records = read_metrics(run_dir)
    assert records[0]["step"] == 0 and "loss" not in records[0]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, total_steps + 1))
    for key in keys:
        assert all(key in r for r in steps), key
    return records, steps


def help_text(module, capsys) -> str:
    """What ``module.main(["--help"])`` (a trainer's command line) prints; it must exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def assert_bitwise(a: dict, b: dict) -> None:
    """Two name -> tensor dicts hold the same names and bit-identical tensors."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    """Two name -> tensor dicts hold the same names and tensors within ``atol``."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol)


class Interrupt(Exception):
    """Raised by ``patch_from_call`` to stop a run where a test wants it stopped."""


def patch_from_call(monkeypatch, module, name: str, call: int, value: float | None = None):
    """Replace ``module.name`` so that from its ``call``-th call on (1-based) it raises
    ``Interrupt`` (``value`` None) or returns its result times ``value`` (NaN: a diverged
    step). Returns the list of calls so far (one entry per call)."""
    real = getattr(module, name)
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) >= call and value is None:
            raise Interrupt(f"call {len(calls)} of {name}")
        result = real(*args, **kwargs)
        return result * value if len(calls) >= call else result

    monkeypatch.setattr(module, name, patched)
    return calls
