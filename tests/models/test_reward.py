"""kernelrl.models.reward: the score at the last real token, HF sequence-classification
checkpoints both ways, gradients."""

import math

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          LlamaConfig, MistralConfig, Qwen2Config)

from kernelrl.models.reward import RewardModel, last_token_index

V, H = 97, 32
TINY = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
PAD = 0            # no real token uses it: ids are drawn from [1, V)
EOS = 5


def causal_lm(family="llama", dtype=torch.float32, seed=0, **extra):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[family](**TINY, **extra), dtype=dtype).eval()


def sequences(seed=1, lengths=(7, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


def pad(seqs, side="right", value=PAD):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), value)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[b, span], mask[b, span] = s, 1
    return ids, mask


def by_hand(rm, ids, mask, last):
    """The decoder's hidden state at the given indices times the head's weight."""
    hidden = rm.decoder(ids, attention_mask=mask).last_hidden_state
    return (hidden[torch.arange(len(last)), torch.tensor(last)] @ rm.score.weight[0]).float()


@pytest.mark.parametrize("side", ["right", "left"])
def test_score_at_last_real_token(side):
    rm = RewardModel.from_causal_lm(causal_lm())
    ids, mask = pad(sequences(), side)
    last = [6, 3, 1] if side == "right" else [6, 6, 6]
    scores = rm(ids, mask)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, by_hand(rm, ids, mask, last), rtol=1e-6, atol=1e-6)
    assert last_token_index(mask).tolist() == last
    # a different index gives a different score: the test can tell them apart
    assert not torch.allclose(scores, by_hand(rm, ids, mask, [0, 0, 0]), atol=1e-3)


def test_left_padding_scores_equal_right_padding():
    rm = RewardModel.from_causal_lm(causal_lm())
    seqs = sequences(seed=2)
    right = rm(*pad(seqs, "right"))
    left = rm(*pad(seqs, "left"))
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


def test_pad_equal_to_eos_uses_the_mask():
    """With pad == eos, a sequence's own final EOS is real (mask 1) and is where it is scored."""
    rm = RewardModel.from_causal_lm(causal_lm(), pad_token_id=EOS)
    seqs = [torch.cat([s, torch.tensor([EOS])]) for s in sequences(seed=3)]
    for side, last in (("right", [7, 4, 2]), ("left", [7, 7, 7])):
        ids, mask = pad(seqs, side, value=EOS)
        torch.testing.assert_close(rm(ids, mask), by_hand(rm, ids, mask, last),
                                   rtol=1e-6, atol=1e-6)


def test_from_causal_lm_shares_the_decoder_and_inits_the_head_small():
    model = causal_lm()
    rm = RewardModel.from_causal_lm(model)
    assert rm.decoder is model.get_decoder()
    assert rm.score.weight.shape == (1, H) and rm.score.bias is None
    assert rm.score.weight.dtype == torch.float32
    torch.manual_seed(4)
    wide = RewardModel.new_head(4095)
    std = wide.weight.std().item()
    assert abs(std * math.sqrt(4096) - 1) < 0.06, std
    bf16 = RewardModel.from_causal_lm(causal_lm(dtype=torch.bfloat16))
    assert bf16.score.weight.dtype == torch.bfloat16
    ids, mask = pad(sequences())
    assert bf16(ids, mask).dtype == torch.float32


@pytest.mark.parametrize("family", list(CONFIGS))
def test_save_pretrained_loads_in_hf(tmp_path, family):
    rm = RewardModel.from_causal_lm(causal_lm(family), pad_token_id=PAD)
    ids, mask = pad(sequences(seed=5), "right")
    with torch.no_grad():
        mine = rm(ids, mask)
    rm.save_pretrained(tmp_path)
    hf, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(hf).__name__ == f"{CONFIGS[family].__name__[:-6]}ForSequenceClassification"
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD
    assert hf.config.architectures == [type(hf).__name__]
    with torch.no_grad():
        theirs = hf.eval()(ids, attention_mask=mask).logits
    assert theirs.shape == (3, 1)
    torch.testing.assert_close(mine, theirs[:, 0], rtol=1e-5, atol=1e-6)
    # and back: kernelrl reads its own checkpoint to the same scores
    with torch.no_grad():
        again = RewardModel.from_pretrained(tmp_path)(ids, mask)
    torch.testing.assert_close(again, mine, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_from_pretrained_reads_hf_checkpoint(tmp_path, family):
    torch.manual_seed(6)
    config = CONFIGS[family](**TINY, num_labels=1, pad_token_id=PAD)
    hf = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.score.weight.normal_(0, 1)
    hf.save_pretrained(tmp_path)
    rm = RewardModel.from_pretrained(tmp_path, dtype="float64")
    assert {p.dtype for p in rm.parameters()} == {torch.float64}
    assert rm.pad_token_id == PAD
    ids, mask = pad(sequences(seed=7), "right")
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[:, 0]
        mine = rm(ids, mask)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_gradients_reach_head_and_decoder():
    model = causal_lm(dtype=torch.float64)
    rm = RewardModel.from_causal_lm(model)
    ids, mask = pad(sequences(seed=8), "left")
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    (rm(ids, mask) * g).sum().backward()
    # d score_b / d w = hidden at b's last token
    with torch.no_grad():
        pooled = rm.pooled_hidden(ids, mask)
    torch.testing.assert_close(rm.score.weight.grad[0], g @ pooled, rtol=1e-10, atol=1e-12)
    # the decoder: the same gradients as autograd through the hand computation
    names = [n for n, _ in rm.decoder.named_parameters()]
    grads = [p.grad.clone() for p in rm.decoder.parameters()]
    rm.zero_grad()
    (by_hand(rm, ids, mask, [6, 6, 6]).double() * g).sum().backward()
    for name, mine, ref in zip(names, grads, [p.grad for p in rm.decoder.parameters()]):
        assert ref.norm() > 0 or name.startswith("embed"), name
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12, msg=name)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None  # shared decoder


def test_errors():
    rm = RewardModel.from_causal_lm(causal_lm())
    ids, mask = pad(sequences())
    mask[1] = 0
    with pytest.raises(ValueError, match=r"attention_mask: rows \[1\] have no real token"):
        rm(ids, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        rm(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="pad_token_id"):
        rm.save_pretrained("/nonexistent-kernelrl-test-folder")


def test_from_pretrained_refuses_a_causal_lm_folder(tmp_path):
    causal_lm().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels"):
        RewardModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        RewardModel.from_pretrained(tmp_path / "missing")
