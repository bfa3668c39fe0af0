"""kernelrl.models.hf: loading from local folders and configs, and the supported-model check."""

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig,
                          LlamaConfig, LlamaModel, PreTrainedTokenizerFast, T5Config,
                          T5ForConditionalGeneration)

from kernelrl.models.hf import check_supported, load_model, load_tokenizer, resolve_dtype

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=dtype)


def test_load_model_from_saved_folder(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")), "save_pretrained wrote no safetensors"
    loaded = load_model(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ref, out = model.state_dict(), loaded.state_dict()
    assert ref.keys() == out.keys()
    for key in ref:
        assert torch.equal(ref[key], out[key]), key
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits,
                               rtol=0, atol=0)


def test_load_model_dtype_builds_in_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # built in the dtype, not cast after: the rotary buffer keeps float32
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32


def test_load_model_from_config():
    config = LlamaConfig(**TINY)
    model = load_model(config, dtype=torch.float64, attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.config._attn_implementation == "eager"
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert config.dtype != torch.float64, "load_model modified the config passed in"
    assert model.config.vocab_size == TINY["vocab_size"]


def test_missing_path_names_it_and_never_downloads(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as err:
        load_model(missing)
    assert str(missing) in str(err.value)
    assert "never downloads" in str(err.value)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model("meta-llama/Llama-3.2-1B")     # a hub id is not a local folder


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(NotADirectoryError, match="expected a folder"):
        load_model(tmp_path / "model.safetensors")
    with pytest.raises(TypeError, match="source"):
        load_model(42)


@pytest.mark.parametrize("config, field", [
    (Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=30.0), "final_logit_softcapping"),
    (CohereConfig(**TINY, logit_scale=0.0625), "logit_scale"),
    (GraniteConfig(**TINY, logits_scaling=4.0), "logits_scaling"),
])
def test_logit_transform_is_refused_naming_the_field(config, field):
    with pytest.raises(ValueError, match=f"config.{field}="):
        load_model(config)


def test_no_op_logit_fields_pass():
    # the same families with the transform switched off fit the lm_head path
    check_supported(AutoModelForCausalLM.from_config(
        Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=None)))
    check_supported(AutoModelForCausalLM.from_config(CohereConfig(**TINY, logit_scale=1.0)))


def test_check_supported_structure():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="get_output_embeddings"):
        check_supported(LlamaModel(LlamaConfig(**TINY)))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32,
                                             num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        check_supported(t5)
    adapted = tiny_llama()
    adapted.lm_head = nn.Sequential(nn.Linear(32, 97))
    with pytest.raises(ValueError, match="plain nn.Linear"):
        check_supported(adapted)
    with pytest.raises(TypeError, match="model"):
        check_supported("llama")
    check_supported(tiny_llama())


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                            pad_token="[PAD]").save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer("hello world foo")["input_ids"] == [2, 3, 0]
    assert tokenizer.pad_token_id == 1

    tiny_llama().save_pretrained(tmp_path / "model")   # weights, no tokenizer
    assert load_tokenizer(tmp_path / "model") is None
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer(tmp_path / "missing")


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(torch.int64)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8")
