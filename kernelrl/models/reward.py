"""A scalar reward model: a causal LM's decoder and a linear head read at the last real token.

Legend: B batch, T time, H hidden width.

    hidden = decoder(input_ids, attention_mask)              [B, T, H]  final norm applied
    last[b] = max{t : attention_mask[b, t] = 1}              [B]        the last real token
    score[b] = hidden[b, last[b]] · w (+ c)                  [B]        float32

The last real token comes from the attention mask, never from token ids, so it is right
for right padding, left padding, and a pad id equal to the EOS id (an EOS that ends a
sequence is a real token, mask 1, and the score is read there).

The head (``score``, an ``nn.Linear(H, 1, bias=False)``) is a module of its own beside
the decoder, so more heads (a value head, a reward adapter) can share one base.

Checkpoints are Hugging Face's sequence-classification format with one label, so
``AutoModelForSequenceClassification.from_pretrained(folder)`` loads what
``save_pretrained`` writes, and ``RewardModel.from_pretrained`` loads what either writes:
config.json (num_labels=1, architectures=["<Arch>ForSequenceClassification"],
pad_token_id) and model.safetensors with the decoder under that class's base-model prefix
(``model.*`` for Llama, Qwen2, Mistral, ...) and the head as ``score.weight``.
One difference remains: Hugging Face's class finds the last token as the rightmost token
that is not ``pad_token_id``, so with pad == EOS and sequences that end in EOS it reads
the token before the EOS, where kernelrl reads the EOS itself.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from kernelrl.models.hf import local_folder, resolve_dtype
from kernelrl.models.logprobs import final_hidden_states

__all__ = ["RewardModel", "last_token_index"]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last real token (rightmost mask 1) of each row of a [B, T] mask.

    Raises ValueError for a row without any real token.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        raise ValueError(f"attention_mask: expected a 2-D [B, T] tensor (1 real, 0 padding), "
                         f"got {_describe(attention_mask)}")
    real = attention_mask != 0
    if not bool(real.any(-1).all()):
        empty = (~real.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask: rows {empty} have no real token (all 0); every "
                         f"sequence needs at least one")
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (steps * real).argmax(-1)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _hidden_size(decoder: nn.Module) -> int:
    config = getattr(decoder, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    if size is None:
        embeddings = decoder.get_input_embeddings()
        size = embeddings.weight.shape[1]
    return int(size)


class RewardModel(nn.Module):
    """A decoder (e.g. LlamaModel) and a scalar head read at each sequence's last real token.

    Args:
        decoder: the decoder of a transformers causal LM (``model.get_decoder()``): maps
            input_ids to the final hidden states [B, T, H]; needs a ``config``.
        score: the head, an ``nn.Linear(H, 1)``; None makes a new one (``new_head``).
        pad_token_id: written to the checkpoint's config by ``save_pretrained``; None
            takes the decoder config's.
    """

    def __init__(self, decoder: nn.Module, score: nn.Linear | None = None, *,
                 pad_token_id: int | None = None):
        super().__init__()
        if not isinstance(decoder, nn.Module) or getattr(decoder, "config", None) is None:
            raise TypeError(f"decoder: expected a transformers decoder module with a config "
                            f"(model.get_decoder()), got {type(decoder).__name__}")
        hidden = _hidden_size(decoder)
        if score is None:
            param = next(decoder.parameters())
            score = self.new_head(hidden, dtype=param.dtype, device=param.device)
        if not isinstance(score, nn.Linear) or score.in_features != hidden or \
                score.out_features != 1:
            shape = (f"nn.Linear({score.in_features}, {score.out_features})"
                     if isinstance(score, nn.Linear) else type(score).__name__)
            raise ValueError(f"score: expected an nn.Linear({hidden}, 1) head, got {shape}")
        self.decoder = decoder
        self.score = score
        if pad_token_id is None:
            pad_token_id = getattr(decoder.config, "pad_token_id", None)
        self.pad_token_id = pad_token_id

    @property
    def config(self):
        """The decoder's transformers config."""
        return self.decoder.config

    @staticmethod
    def new_head(hidden_size: int, *, dtype=torch.float32, device="cpu") -> nn.Linear:
        """A fresh ``nn.Linear(H, 1, bias=False)`` with weights ~ N(0, 1/(H + 1)).

        std 1/sqrt(H + 1) keeps the initial scores of order one for unit-scale hidden
        states. Drawn in float32 from torch's global generator (seed it for repeatable
        heads), then cast to ``dtype``.
        """
        head = nn.Linear(hidden_size, 1, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            weight = torch.randn(1, hidden_size, dtype=torch.float32, device=device)
            head.weight.copy_(weight / math.sqrt(hidden_size + 1))
        return head

    @classmethod
    def from_causal_lm(cls, model: nn.Module, *, pad_token_id: int | None = None):
        """A reward model on ``model.get_decoder()``, shared (not copied) with ``model``,
        and a new head (``new_head``: N(0, 1/(H + 1)) weights, in the decoder's dtype and
        on its device). Training it trains that causal LM's decoder too; the lm_head is
        unused."""
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"model: {type(model).__name__} is an encoder-decoder model; "
                             f"expected a decoder-only causal LM")
        if not callable(getattr(model, "get_decoder", None)):
            raise TypeError(f"model: expected a transformers causal LM with get_decoder(), "
                            f"got {type(model).__name__}")
        return cls(model.get_decoder(), pad_token_id=pad_token_id)

    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      *, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden state at each sequence's last real token: [B, H].

        attention_mask None means no padding (the last token is T − 1).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or \
                input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected a [B, T] tensor with T >= 1, got "
                             f"{_describe(input_ids)}")
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1,
                              device=input_ids.device)
        else:
            if attention_mask.ndim != 2 or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask: expected a 2-D mask of shape "
                                 f"{tuple(input_ids.shape)} (that of input_ids), got "
                                 f"{_describe(attention_mask)}")
            last = last_token_index(attention_mask)
        hidden = final_hidden_states(self.decoder, input_ids, attention_mask, position_ids)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last.to(hidden.device)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B], float32: the head applied to ``pooled_hidden``."""
        pooled = self.pooled_hidden(input_ids, attention_mask, position_ids=position_ids)
        return self.score(pooled.to(self.score.weight.dtype)).squeeze(-1).float()

    # -----------------------------------------------------------------------------------
    # Hugging Face sequence-classification checkpoints
    # -----------------------------------------------------------------------------------

    def _seq_cls_class(self):
        import transformers
        from transformers.models.auto.modeling_auto import \
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names

        model_type = getattr(self.config, "model_type", None)
        name = names.get(model_type)
        if name is None or not hasattr(transformers, name):
            raise ValueError(f"model_type {model_type!r} has no sequence-classification class "
                             f"in transformers {transformers.__version__}; save_pretrained "
                             f"writes that class's checkpoint format")
        return getattr(transformers, name)

    def save_pretrained(self, folder, *, pad_token_id: int | None = None) -> Path:
        """Write a Hugging Face sequence-classification checkpoint with one label.

        ``folder``/config.json: the decoder's config with num_labels=1,
        architectures=["<Arch>ForSequenceClassification"], pad_token_id (the argument, else
        this model's; one is required: Hugging Face finds the last token by it) and the
        weights' dtype. ``folder``/model.safetensors: the decoder's weights under that
        class's base-model prefix and the head as ``score.weight``, checked key for key
        against the class built on the meta device. Returns the folder.
        """
        from safetensors.torch import save_file

        cls = self._seq_cls_class()
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            raise ValueError("pad_token_id: expected an int (Hugging Face's sequence "
                             "classifier finds each sequence's last token by it), got None "
                             "here and in the decoder's config")
        config = copy.deepcopy(self.config)
        config.num_labels = 1
        config.architectures = [cls.__name__]
        config.pad_token_id = int(pad)
        config.dtype = next(self.decoder.parameters()).dtype
        prefix = cls.base_model_prefix
        tensors = {f"{prefix}.{k}": v for k, v in self.decoder.state_dict().items()}
        tensors.update({f"score.{k}": v for k, v in self.score.state_dict().items()})
        with torch.device("meta"):
            expected = set(cls(copy.deepcopy(config)).state_dict())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"{cls.__name__}: its weight names do not match this model's "
                             f"(missing {missing[:5]}, unexpected {extra[:5]}); this decoder "
                             f"cannot be saved in that format")
        seen, out = set(), {}
        for key, value in tensors.items():          # safetensors refuses shared storage
            value = value.detach()
            ptr = value.untyped_storage().data_ptr()
            value = value.clone() if ptr in seen else value
            seen.add(ptr)
            out[key] = value.contiguous().cpu()
        path = Path(folder).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
        return path

    @classmethod
    def from_pretrained(cls, folder, *, dtype=torch.float32, device="cpu",
                        attn_implementation=None):
        """Load a one-label sequence-classification checkpoint (written by Hugging Face or
        by ``save_pretrained``) from a local folder, built in ``dtype`` and moved to
        ``device``. Every weight must be in the checkpoint (no random initialisation)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        path = local_folder(folder, "folder")
        dtype = resolve_dtype(dtype)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if getattr(config, "num_labels", None) != 1:
            raise ValueError(f"folder: expected a sequence-classification checkpoint with one "
                             f"label (config.num_labels=1), got num_labels="
                             f"{getattr(config, 'num_labels', None)} in {str(path)!r}; for a "
                             f"causal LM use RewardModel.from_causal_lm(load_model(folder))")
        kwargs = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        hf, info = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, output_loading_info=True, **kwargs)
        if info.get("missing_keys"):
            raise ValueError(f"folder: the checkpoint in {str(path)!r} lacks weights "
                             f"{sorted(info['missing_keys'])[:5]}")
        score = getattr(hf, "score", None)
        if not isinstance(score, nn.Linear):
            raise ValueError(f"folder: expected {type(hf).__name__} to have an nn.Linear "
                             f"head named score, got {type(score).__name__}")
        model = cls(hf.base_model, score, pad_token_id=config.pad_token_id)
        return model.to(device)
