"""Rollouts: KV-cache sampling against transformers' generate and a full forward, the
samplers' filters, EOS/stop handling, and the rollout log-probs the PPO update reuses."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kernelrl.models.lora import apply_lora, disable_adapters, lora_modules, use_adapter
from kernelrl.train.rollout import (FINISHED_CHECK_EVERY, Rollout, bad_token_mask,
                                    filter_logits, generate, logprob_drift, next_token_logits,
                                    pad_prompts, positions_from_mask, rollout_logprobs,
                                    sample_tokens)

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
WIDTH = 5   # the longest prompt


def config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config()).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the machine is shared, and bitwise comparisons need the same
    thread count in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def hf_greedy(model, prompts, max_new_tokens, eos_token_id):
    ids, mask = pad_prompts(prompts, PAD)
    return model.generate(ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=PAD)


def greedy(model, prompts=PROMPTS, max_new_tokens=8, **kw):
    kw.setdefault("eos_token_id", None)
    return generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0,
                    pad_token_id=PAD, **kw)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- greedy against transformers ---------------------------------------------------------------

def test_greedy_equals_transformers_generate_batched_and_unbatched(model):
    # An EOS that row 0 emits at its third step: row 0 ends early, the others do not.
    eos = greedy(model).responses()[0][2]
    out = greedy(model, max_new_tokens=8, eos_token_id=eos)
    assert bool(out.finished[0]) and int(out.response_lengths[0]) <= 3
    assert torch.equal(out.sequences, hf_greedy(model, PROMPTS, 8, eos))
    for b, prompt in enumerate(PROMPTS):
        one = greedy(model, [prompt], max_new_tokens=8, eos_token_id=eos)
        assert torch.equal(one.sequences, hf_greedy(model, [prompt], 8, eos))
        assert one.responses()[0] == out.responses()[b]
        assert one.prompts()[0] == prompt


def test_prompts_are_left_padded_with_positions_from_the_mask(model):
    out = greedy(model, max_new_tokens=3)
    assert out.prompt_length == WIDTH
    assert out.sequences[1, :WIDTH].tolist() == [PAD, PAD, PAD, 10, 11]
    assert out.attention_mask[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert out.position_ids[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    ids, mask = pad_prompts([torch.tensor([3, 4]), [5]], PAD)
    assert ids.tolist() == [[3, 4], [PAD, 5]] and mask.tolist() == [[1, 1], [0, 1]]


# ---- the KV-cache decode step ------------------------------------------------------------------

def test_cached_decode_logits_equal_full_forward_last_position(model):
    calls = []

    def recording_step(m, input_ids, attention_mask, position_ids, cache):
        logits, cache = next_token_logits(m, input_ids, attention_mask, position_ids, cache)
        calls.append((attention_mask.clone(), position_ids.clone(), logits.clone()))
        return logits, cache

    # A stop token row 0 samples early, so some rows are finished (mask 0) mid-way.
    first = generate(model, PROMPTS, max_new_tokens=7, temperature=1.0, eos_token_id=None,
                     pad_token_id=PAD, generator=gen(3))
    stop = first.responses()[0][1]
    out = generate(model, PROMPTS, max_new_tokens=7, temperature=1.0, eos_token_id=None,
                   pad_token_id=PAD, stop_token_ids=(stop,), generator=gen(3),
                   decode_step=recording_step)
    assert len(calls) == out.response_width - 1 and bool(out.finished[0])
    saw_finished = False
    for r, (mask, position, logits) in enumerate(calls):
        t = WIDTH + r + 1
        assert torch.equal(mask, out.attention_mask[:, :t])
        with torch.no_grad():
            full = model(input_ids=out.sequences[:, :t], attention_mask=mask,
                         position_ids=positions_from_mask(mask)).logits[:, -1]
        alive = mask[:, -1] == 1
        saw_finished |= not bool(alive.all())
        assert torch.equal(position[alive], positions_from_mask(mask)[alive, -1:])
        torch.testing.assert_close(logits[alive], full[alive], rtol=1e-5, atol=1e-5)
    assert saw_finished


# ---- sampling ----------------------------------------------------------------------------------

def test_batched_sample_equals_unbatched_with_a_generator_per_row(model):
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95, eos_token_id=None,
              pad_token_id=PAD)
    seeds = [11, 12, 13]
    batched = generate(model, PROMPTS, generator=[gen(s) for s in seeds], **kw)
    for b, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        alone = generate(model, [prompt], generator=[gen(seed)], **kw)
        assert alone.responses()[0] == batched.responses()[b]
    other = generate(model, PROMPTS, generator=[gen(s + 100) for s in seeds], **kw)
    assert other.responses() != batched.responses()


def test_sampling_is_reproducible_with_the_same_generator(model):
    kw = dict(max_new_tokens=10, temperature=1.0, eos_token_id=None, pad_token_id=PAD)
    a = generate(model, PROMPTS, generator=gen(5), **kw)
    b = generate(model, PROMPTS, generator=gen(5), **kw)
    c = generate(model, PROMPTS, generator=gen(6), **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    assert not torch.equal(a.sequences, c.sequences)


def test_top_k_one_equals_greedy(model):
    sampled = generate(model, PROMPTS, max_new_tokens=8, temperature=0.7, top_k=1,
                       eos_token_id=None, pad_token_id=PAD, generator=gen(0))
    assert torch.equal(sampled.sequences, greedy(model).sequences)


def test_samples_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(40000, 4)
    tokens, logprobs = sample_tokens(logits, temperature=1.0, generator=gen(0))
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), rtol=0, atol=0.01)
    # top_k=2 renormalises over the two largest; the log-prob stays the unfiltered one.
    tokens, logprobs = sample_tokens(logits, temperature=1.0, top_k=2, generator=gen(1))
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.tensor([0, 0, 3 / 7, 4 / 7]), rtol=0, atol=0.01)
    torch.testing.assert_close(logprobs, logits.gather(1, tokens[:, None]).squeeze(1))
    # Temperature 0.5 squares the probabilities (then renormalises).
    tokens, _ = sample_tokens(logits, temperature=0.5, generator=gen(2))
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.tensor([1, 4, 9, 16]) / 30.0, rtol=0, atol=0.01)


PROBS = [0.125, 0.5, 0.0625, 0.25, 0.0625]    # ranked: 1 (0.5), 3 (0.25), 0 (0.125), 2 = 4


def kept(logits):
    return [sorted(torch.isfinite(row).nonzero().squeeze(1).tolist()) for row in logits]


@pytest.mark.parametrize("top_p,expected", [
    (0.3, [1]),              # 0.5 alone reaches 0.3
    (0.7, [1, 3]),           # 0.5 < 0.7, 0.75 >= 0.7: the smallest set with mass >= top_p
    (0.8, [0, 1, 3]),        # 0.75 < 0.8 <= 0.875
    (0.95, [0, 1, 2, 3, 4]),  # 0.9375 < 0.95
    (1.0, [0, 1, 2, 3, 4]),
])
def test_top_p_keeps_exactly_the_nucleus(top_p, expected):
    logits = torch.log(torch.tensor([PROBS, PROBS[::-1]]))
    flipped = sorted(len(PROBS) - 1 - i for i in expected)
    assert kept(filter_logits(logits, top_p=top_p)) == [expected, flipped]
    # kept logits are untouched
    out = filter_logits(logits, top_p=top_p)
    keep = torch.isfinite(out)
    assert torch.equal(out[keep], logits[keep])


def test_top_p_applies_after_top_k_on_the_renormalised_distribution():
    logits = torch.log(torch.tensor([PROBS]))
    assert kept(filter_logits(logits, top_k=2)) == [[1, 3]]
    assert kept(filter_logits(logits, top_k=3)) == [[0, 1, 3]]
    # After top-k=3 the masses are 4/7, 2/7, 1/7: 6/7 >= 0.8, so token 0 goes (without the
    # renormalisation 0.75 < 0.8 would keep it).
    assert kept(filter_logits(logits, top_k=3, top_p=0.8)) == [[1, 3]]
    # the top token survives any top_p
    assert kept(filter_logits(torch.tensor([[0.0, 10.0, 0.0]]), top_p=1e-6)) == [[1]]


# ---- banned tokens ------------------------------------------------------------------------------

BANNED = (0, 1, 3)     # pad, BOS and another id; EOS (2) stays allowed


def dominated_model(seed: int = 0, boost: float = 12.0) -> LlamaForCausalLM:
    """``tiny_model`` whose lm_head has a bias of ``boost`` on the BANNED ids: whatever the
    hidden state, one of them has the highest logit at every position."""
    model = tiny_model(seed)
    head = torch.nn.Linear(32, 64, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[list(BANNED)] = boost
    model.lm_head = head
    return model.eval()


def test_sample_tokens_ban_renormalises_and_keeps_the_unbanned_logprobs():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(40000, 4)
    banned = bad_token_mask([3], 4)
    assert banned.tolist() == [False, False, False, True]
    tokens, logprobs = sample_tokens(logits, temperature=1.0, generator=gen(0), banned=banned)
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.tensor([1, 2, 3, 0]) / 6.0, rtol=0, atol=0.01)
    # the log-prob is the policy's, over the whole vocabulary (not renormalised over 0..2)
    torch.testing.assert_close(logprobs, logits.gather(1, tokens[:, None]).squeeze(1))
    # the ban comes before top-k: top_k=2 keeps the two largest allowed (1 and 2)
    tokens, _ = sample_tokens(logits, temperature=0.7, top_k=2, generator=gen(1), banned=banned)
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    p = torch.tensor([0.0, 0.2, 0.3, 0.0]) ** (1 / 0.7)
    torch.testing.assert_close(freq, p / p.sum(), rtol=0, atol=0.01)
    # and before top-p and greedy
    tokens, _ = sample_tokens(logits, top_p=0.3, generator=gen(2), banned=banned)
    assert set(tokens.tolist()) == {2}
    tokens, logprobs = sample_tokens(logits[:2], temperature=0, banned=banned)
    assert tokens.tolist() == [2, 2]
    torch.testing.assert_close(logprobs, logits[:2, 2])
    assert bad_token_mask(None, 4) is None and bad_token_mask([], 4) is None


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 5, 0.9), (0.0, 0, 1.0)])
def test_banned_ids_are_never_sampled_even_when_their_logit_is_the_highest(temperature, top_k,
                                                                            top_p):
    model = dominated_model()
    kw = dict(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p,
              eos_token_id=2, pad_token_id=PAD)
    # Without the ban the model says little else (a banned id is every step's argmax).
    free = generate(model, PROMPTS, generator=gen(3), **kw)
    said = [t for row in free.responses() for t in row]
    assert sum(t in BANNED for t in said) > 0.9 * len(said)
    for seed in range(4):
        out = generate(model, PROMPTS, generator=[gen(seed + 10 * b) for b in range(3)],
                       bad_token_ids=list(BANNED), **kw)
        assert out.response_lengths.min() >= 1
        for row in out.responses():
            assert not set(row) & set(BANNED), row
        # The rollout log-probs: the same call twice (old, and new with gradients, as a PPO
        # update makes them) are bitwise equal, so the first epoch's ratio is exactly 1.
        tau = temperature or 1.0
        with torch.no_grad():
            old = rollout_logprobs(model, out, temperature=tau)
        new = rollout_logprobs(model, out, temperature=tau)
        assert new.requires_grad and torch.equal(new.detach(), old)
        ratio = (new.detach() - old).exp()[out.response_mask == 1]
        assert bool((ratio == 1).all())
        # The sampler recorded the same unbanned log-probs (drift at float rounding): much
        # lower than under the sampler's renormalised distribution, as the banned ids
        # hold most of the mass.
        assert float(logprob_drift(out, old)) < 1e-4
        assert float(old[out.response_mask == 1].max()) < -5


def test_ban_with_top_k_one_is_greedy_with_the_ban():
    model = dominated_model()
    kw = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=PAD, bad_token_ids=BANNED)
    greedy_ban = generate(model, PROMPTS, temperature=0, **kw)
    top1 = generate(model, PROMPTS, temperature=0.9, top_k=1, generator=gen(0), **kw)
    assert torch.equal(greedy_ban.sequences, top1.sequences)
    with torch.no_grad():
        logits = model(input_ids=greedy_ban.sequences, attention_mask=greedy_ban.attention_mask,
                       position_ids=greedy_ban.position_ids).logits
    logits[..., list(BANNED)] = float("-inf")
    want = logits[:, WIDTH - 1:-1].argmax(-1)           # the allowed argmax at each step
    assert torch.equal(greedy_ban.response_ids, want)


def test_a_ban_draws_the_same_noise():
    """The ban changes a row only where a banned id would have been drawn: the noise is
    drawn the same, so rows that never met a banned id are unchanged."""
    model = tiny_model()
    kw = dict(max_new_tokens=10, eos_token_id=None, pad_token_id=PAD)
    free = generate(model, PROMPTS, generator=gen(7), **kw)
    rows = free.responses()
    unused = sorted(set(range(4, 64)) - {t for row in rows for t in row})[:5]
    assert unused
    banned = generate(model, PROMPTS, generator=gen(7), bad_token_ids=unused, **kw)
    assert torch.equal(free.sequences, banned.sequences)
    assert torch.equal(free.sampler_logprobs, banned.sampler_logprobs)


# ---- EOS and stop tokens -------------------------------------------------------------------------

def test_eos_and_stop_tokens_end_rows_and_pad_after(model):
    preview = greedy(model, max_new_tokens=6).responses()
    stop, eos = preview[0][2], preview[1][1]
    out = greedy(model, max_new_tokens=6, eos_token_id=eos, stop_token_ids=(stop,))
    width = out.response_width
    for b, row in enumerate(preview):
        ends = [i for i, t in enumerate(row) if t in (stop, eos)]
        n = ends[0] + 1 if ends else 6
        assert out.responses()[b] == row[:n]
        assert int(out.response_lengths[b]) == n
        assert bool(out.finished[b]) == bool(ends)
        assert out.response_mask[b].tolist() == [1] * n + [0] * (width - n)
        assert out.response_ids[b, n:].tolist() == [PAD] * (width - n)
        assert torch.equal(out.attention_mask[b, WIDTH:], out.response_mask[b])
        assert bool((out.sampler_logprobs[b, n:] == 0).all())
        assert bool((out.sampler_logprobs[b, :n] < 0).all())
    assert bool(out.finished[0]) and bool(out.finished[1])
    assert int(out.response_lengths[0]) <= 3 and int(out.response_lengths[1]) <= 2
    assert width == int(out.response_lengths.max())


def test_all_rows_finished_stops_early_and_trims_the_width(model):
    preview = greedy(model, max_new_tokens=1).responses()
    calls = []

    def counting_step(*args):
        calls.append(1)
        return next_token_logits(*args)

    out = greedy(model, max_new_tokens=40, stop_token_ids=tuple({r[0] for r in preview}),
                 decode_step=counting_step)
    assert out.response_width == 1 and out.sequences.shape == (3, WIDTH + 1)
    assert out.finished.tolist() == [True] * 3
    assert len(calls) < FINISHED_CHECK_EVERY
    cut = greedy(model, max_new_tokens=4)
    assert cut.finished.tolist() == [False] * 3
    assert cut.response_lengths.tolist() == [4] * 3 and cut.response_width == 4


# ---- rollout log-probs ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 0.9), (0.0, 0, 1.0)])
def test_sampler_logprobs_match_rollout_logprobs(model, temperature, top_k, top_p):
    out = generate(model, PROMPTS, max_new_tokens=9, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_token_id=None, stop_token_ids=(7, 40), pad_token_id=PAD,
                   generator=gen(1))
    tau = temperature or 1.0
    with torch.no_grad():
        logp = rollout_logprobs(model, out, temperature=tau)
        again = rollout_logprobs(model, out, temperature=tau)
    assert logp.shape == out.sampler_logprobs.shape and logp.dtype == torch.float32
    assert torch.equal(logp, again)
    assert bool((logp[out.response_mask == 0] == 0).all())
    assert bool((logp[out.response_mask == 1] < 0).all())
    drift = logprob_drift(out, logp)
    assert drift.ndim == 0 and float(drift) < 1e-4
    manual = (out.sampler_logprobs - logp).abs()[out.response_mask == 1].max()
    assert float(drift) == float(manual)
    # A wrong temperature is seen as drift.
    with torch.no_grad():
        assert float(logprob_drift(out, rollout_logprobs(model, out, temperature=tau * 2))) > 1e-3


def test_rollout_logprobs_against_full_logits_with_entropy(model):
    out = generate(model, PROMPTS, max_new_tokens=6, eos_token_id=None, stop_token_ids=(9,),
                   pad_token_id=PAD, generator=gen(2))
    with torch.no_grad():
        logp, ent = rollout_logprobs(model, out, return_entropy=True)
        logits = model(input_ids=out.sequences, attention_mask=out.attention_mask,
                       position_ids=out.position_ids).logits.double()
    full = logits[:, WIDTH - 1:-1].log_softmax(-1)                       # [B, R, V]
    want = full.gather(-1, out.response_ids[..., None]).squeeze(-1)
    want_ent = -(full.exp() * full).sum(-1)
    keep = out.response_mask == 1
    torch.testing.assert_close(logp[keep].double(), want[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[keep].double(), want_ent[keep], rtol=1e-5, atol=1e-5)
    assert bool((ent[~keep] == 0).all())
    labels = out.labels
    assert bool((labels[:, :WIDTH] == -100).all())
    assert torch.equal(labels[:, WIDTH:][keep], out.response_ids[keep])


def test_lora_model_under_use_adapter():
    model = tiny_model(1)
    apply_lora(model, r=4, alpha=8, adapter_name="policy")
    torch.manual_seed(7)
    for _, m in lora_modules(model):
        m.lora.B["policy"].data.normal_(std=0.3)
    with use_adapter(model, "policy"):
        adapted = greedy(model, max_new_tokens=8)
        assert torch.equal(adapted.sequences, hf_greedy(model, PROMPTS, 8, None))
        sampled = generate(model, PROMPTS, max_new_tokens=8, eos_token_id=None,
                           pad_token_id=PAD, generator=gen(4))
        with torch.no_grad():
            old = rollout_logprobs(model, sampled)
        new = rollout_logprobs(model, sampled)          # with grad, as the PPO update
        assert new.requires_grad
        assert torch.equal(old, new.detach())            # ratio exp(new - old) is exactly 1
        assert float(logprob_drift(sampled, old)) < 1e-4
    with disable_adapters(model):
        base = greedy(model, max_new_tokens=8)
    assert not torch.equal(base.sequences, adapted.sequences)


def test_bf16_model_runs():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(), dtype=torch.bfloat16).eval()
    assert model.lm_head.weight.dtype == torch.bfloat16
    out = generate(model, PROMPTS, max_new_tokens=6, top_p=0.9, eos_token_id=None,
                   pad_token_id=PAD, generator=gen(0))
    assert out.sequences.shape == (3, WIDTH + 6)
    assert out.sampler_logprobs.dtype == torch.float32
    with torch.no_grad():
        logp = rollout_logprobs(model, out)
    assert logp.dtype == torch.float32 and bool(torch.isfinite(logp).all())
    assert float(logprob_drift(out, logp)) < 0.1


# ---- helpers and errors ------------------------------------------------------------------------

def test_texts_decode_the_responses():
    from train_helpers import make_tokenizer, tiny_config
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    prompt = tokenizer("count from two to five :")["input_ids"]
    out = generate(model, [prompt, prompt[:2]], max_new_tokens=4, temperature=0,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = out.texts(tokenizer)
    assert texts == [tokenizer.decode(r, skip_special_tokens=True) for r in out.responses()]
    assert all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=60), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(temperature=-0.5), "temperature"),
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
    (dict(prompts=[[1, 64]]), r"prompts\[0\]"),
    (dict(prompts=[list(range(1, 63)) + [1, 2, 3]]), "max_position_embeddings"),
    (dict(prompts="hello"), "prompts"),
    (dict(pad_token_id=64), "pad_token_id"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(generator=[torch.Generator()]), "generator"),
    (dict(generator="seed"), "generator"),
    (dict(bad_token_ids=[5, 64]), r"bad_token_ids: expected a token id in \[0, 64\), got 64"),
    (dict(bad_token_ids=[-1]), r"bad_token_ids: .* got -1"),
    (dict(bad_token_ids=5), "bad_token_ids: expected a sequence"),
    (dict(bad_token_ids=["5"]), "bad_token_ids"),
    (dict(eos_token_id=2, bad_token_ids=[5, 2]), "bad_token_ids: 2 is eos_token_id; EOS "
                                                 "cannot be banned"),
    (dict(stop_token_ids=(7,), bad_token_ids=[7]), "bad_token_ids: 7 is in stop_token_ids"),
    (dict(bad_token_ids=list(range(64))), "bad_token_ids: bans all 64 tokens"),
])
def test_errors_name_the_argument(model, kw, match):
    args = dict(prompts=PROMPTS, max_new_tokens=4, eos_token_id=None, pad_token_id=PAD)
    args.update(kw)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, **args)


def test_drift_and_scoring_check_their_inputs(model):
    out = greedy(model, max_new_tokens=3)
    assert isinstance(out, Rollout)
    with pytest.raises(ValueError, match="logprobs"):
        logprob_drift(out, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="rollout"):
        rollout_logprobs(model, out.sequences)
    with pytest.raises(ValueError, match="decode_step"):
        greedy(model, max_new_tokens=3,
               decode_step=lambda *a: (torch.zeros(3, 7), a[-1]))
