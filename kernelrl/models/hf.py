"""Loading Hugging Face causal LMs for kernelrl, from local folders only, and the check that
a model fits kernelrl's log-prob path.

kernelrl never downloads: a model comes from a local folder (``config.json`` plus
safetensors weights, as ``save_pretrained`` writes it) or from a ``PretrainedConfig``
(random weights, for tests and from-scratch runs).

What kernelrl needs from a model (``check_supported``): it is decoder-only, and its logits
are exactly ``lm_head(decoder(input_ids))``::

    hidden = model.get_decoder()(input_ids, ...).last_hidden_state   [B, T, H]  final norm applied
    logits = hidden @ lm_head.weight.T (+ lm_head.bias)              [B, T, V]  never built whole

so that ``kernelrl.ops.linear_logprobs`` can compute log-probs from ``hidden`` and the
``lm_head`` weight without the [B, T, V] logits. A model whose causal-LM forward transforms
the logits after the ``lm_head`` (tanh soft-capping, a multiplier or divisor) would get
log-probs of different logits, so it is refused with the config field that says so.
Legend: B batch, T time, V vocabulary, H hidden width.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_model", "load_tokenizer", "check_supported", "resolve_dtype",
           "UNSUPPORTED_LOGIT_FIELDS"]

# Config fields of transformers' causal LMs that transform the logits after the lm_head,
# with the value at which the field is a no-op. softcapping: logits = c·tanh(logits / c)
# (Gemma 2/3/4, VaultGemma, RecurrentGemma, xLSTM); scales: logits·s or logits / s
# (Cohere's logit_scale, Granite's and HyperCLOVA X's logits_scaling, Falcon-H1's
# lm_head_multiplier, output_multiplier).
UNSUPPORTED_LOGIT_FIELDS = {
    "final_logit_softcapping": None,
    "logits_soft_cap": None,
    "output_logit_soft_cap": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "lm_head_multiplier": 1.0,
    "output_multiplier": 1.0,
}

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}

# Files any one of which means a folder holds a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def resolve_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """A floating torch.dtype from a torch.dtype or its name ("bfloat16", "bf16", ...)."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"{name}: expected a floating dtype or one of "
                             f"{sorted(_DTYPE_NAMES)}, got {dtype!r}")
        return _DTYPE_NAMES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating torch.dtype (torch.float32, "
                         f"torch.bfloat16, ...), got {dtype!r}")
    return dtype


def local_folder(source, name: str = "source") -> Path:
    """``source`` as an existing local folder holding a config.json, or a clear error."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a local folder path (str or os.PathLike) or a "
                        f"transformers PretrainedConfig, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{name}: no such local folder: {str(path)!r}. kernelrl never downloads from the "
            f"Hugging Face Hub; download the model yourself (e.g. `hf download <repo> "
            f"--local-dir <folder>`) and pass that folder")
    if not path.is_dir():
        raise NotADirectoryError(f"{name}: expected a folder holding config.json and "
                                 f"safetensors weights, got the file {str(path)!r}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name}: the folder {str(path)!r} has no config.json; "
                                f"expected a model folder as save_pretrained writes it "
                                f"(config.json and *.safetensors)")
    return path


def load_model(source, *, dtype=torch.float32, device="cpu", attn_implementation=None):
    """A Hugging Face causal LM from a local folder or a config, checked by ``check_supported``.

    Args:
        source: a local folder with ``config.json`` and safetensors weights (loaded with
            ``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)``), or a
            ``transformers.PretrainedConfig`` (random weights, ``from_config``; the config
            passed in is copied, not modified).
        dtype: the parameters' dtype (a torch.dtype or its name). The model is built in it,
            never cast afterwards, so the rotary-embedding buffers keep their own dtype.
        device: where the model is moved after loading.
        attn_implementation: "sdpa", "eager", "flash_attention_2", ...; None keeps
            transformers' default.

    Raises FileNotFoundError for a missing folder or one without config.json (kernelrl
    never downloads), ValueError for a model kernelrl cannot train (see check_supported).
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    dtype = resolve_dtype(dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(source, PretrainedConfig):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(source), **kwargs)
    else:
        path = local_folder(source)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
        from kernelrl.models.qlora import from_bitsandbytes    # (qlora imports this package)
        from_bitsandbytes(model)          # a bitsandbytes 4-bit checkpoint: kernelrl's NF4
    check_supported(model)
    return model.to(device)


def load_tokenizer(path):
    """The tokenizer saved in a local folder, or None when the folder holds no tokenizer.

    Local only (``AutoTokenizer.from_pretrained(path, local_files_only=True)``); the folder
    must exist. A folder counts as holding a tokenizer when it has any of
    tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt,
    spiece.model, sentencepiece.bpe.model.
    """
    from transformers import AutoTokenizer

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a local folder path (str or os.PathLike), got "
                        f"{type(path).__name__}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"path: no such local folder: {str(folder)!r}. kernelrl "
                                f"never downloads tokenizers from the Hugging Face Hub")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _configs(config):
    """The config and, when it differs (multimodal wrappers), its text config."""
    out = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        text = get_text()
        if text is not None and text is not config:
            out.append(text)
    return out


def check_supported(model) -> None:
    """Raise a ValueError naming what is wrong unless ``model`` fits kernelrl's log-prob path.

    Required: a decoder-only model (``config.is_encoder_decoder`` false) with
    ``get_decoder()`` returning the module that maps input_ids to the final (normed)
    hidden states, and ``get_output_embeddings()`` returning a plain ``nn.Linear`` lm_head
    of shape [V, H]; and no transform of the logits after the lm_head (the config fields
    in ``UNSUPPORTED_LOGIT_FIELDS`` at their no-op values). A PEFT model passes when its
    lm_head is not itself adapted (an adapted lm_head is not a plain nn.Linear).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers causal LM (an nn.Module), got "
                        f"{type(model).__name__}")
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model: {name} has no .config; expected a transformers causal LM")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {name} is an encoder-decoder model "
                         f"(config.is_encoder_decoder=True); kernelrl trains decoder-only "
                         f"causal LMs")
    for method in ("get_decoder", "get_output_embeddings"):
        if not callable(getattr(model, method, None)):
            raise ValueError(f"model: {name} has no {method}(); expected a decoder-only "
                             f"causal LM (e.g. LlamaForCausalLM)")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"model: {name}.get_output_embeddings() is None: it has no lm_head "
                         f"(a base model such as LlamaModel, not LlamaForCausalLM?)")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model: expected the lm_head (get_output_embeddings()) to be a "
                         f"plain nn.Linear, got {type(head).__module__}."
                         f"{type(head).__qualname__}: kernelrl computes the "
                         f"logits as hidden @ lm_head.weight.T + bias, which would skip "
                         f"whatever else this module does (an adapter, a dense layer, a norm)")
    decoder = model.get_decoder()
    if decoder is None or decoder is model:
        raise ValueError(f"model: {name}.get_decoder() did not return a decoder module "
                         f"separate from the causal LM, got "
                         f"{'None' if decoder is None else 'the model itself'}")
    for cfg in _configs(config):
        for field, noop in UNSUPPORTED_LOGIT_FIELDS.items():
            value = getattr(cfg, field, noop)
            if value is None or value == noop:
                continue
            raise ValueError(
                f"model: {name} transforms its logits after the lm_head "
                f"(config.{field}={value!r}, expected {noop!r}); kernelrl's log-probs use "
                f"the plain lm_head logits and would not match this model's own")
