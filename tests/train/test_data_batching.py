"""kernelrl.train.batching: padding, preference batches, packing, and the resumable order."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kernelrl.train.batching import (BatchLoader, ResumableSampler, block_causal_mask,
                                     collate_packed, collate_preferences, collate_sft,
                                     pack_rows)
from kernelrl.train.data import (DataStats, PreferenceDataset, PreferenceSample, SFTDataset,
                                 SFTSample)

X = -100


def sft(ids, n_prompt):
    labels = [X] * n_prompt + ids[n_prompt:]
    return SFTSample(list(ids), labels)


# ---------------------------------------------------------------------------------------
# Padding

def test_collate_sft_right_pads_with_masks():
    batch = collate_sft([sft([5, 6, 7, 8], 2), sft([9, 10], 1)], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.labels.tolist() == [[X, X, 7, 8], [X, 10, X, X]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert (batch.num_label_tokens, batch.num_examples, batch.packed) == (3, 2, False)
    inputs = batch.model_inputs()
    assert inputs["attention_mask"] is batch.attention_mask and inputs["use_cache"] is False

    batch = collate_sft([sft([5, 6, 7], 1)], pad_token_id=1, pad_to_multiple_of=4)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1]]
    assert batch.labels.tolist() == [[X, 6, 7, X]]


def test_collate_preferences_flattens_rankings_and_indexes_pairs():
    a = PreferenceSample([1, 2], [[3, 4], [5], [6, 7, 8]], [(0, 1), (0, 2), (1, 2)])
    b = PreferenceSample([9], [[10], [11, 12]], [(0, 1)])
    batch = collate_preferences([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 0], [1, 2, 5, 0, 0], [1, 2, 6, 7, 8],
                                        [9, 10, 0, 0, 0], [9, 11, 12, 0, 0]]
    assert batch.labels.tolist() == [[X, X, 3, 4, X], [X, X, 5, X, X], [X, X, 6, 7, 8],
                                     [X, 10, X, X, X], [X, 11, 12, X, X]]
    assert batch.attention_mask.sum(1).tolist() == [4, 3, 5, 2, 3]
    assert batch.lengths.tolist() == [4, 3, 5, 2, 3]
    assert batch.prompt_lengths.tolist() == [2, 2, 2, 1, 1]
    assert batch.seq_prompt.tolist() == [0, 0, 0, 1, 1]
    assert batch.better.tolist() == [0, 0, 1, 3]
    assert batch.worse.tolist() == [1, 2, 2, 4]
    assert batch.pair_prompt.tolist() == [0, 0, 0, 1]
    assert batch.pair_weight.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert (batch.num_prompts, batch.num_pairs, batch.num_sequences) == (2, 4, 5)
    # an empty prompt: the first response token has nothing before it to predict it
    batch = collate_preferences([PreferenceSample([], [[3, 4], [5]], [(0, 1)])], 0)
    assert batch.labels.tolist() == [[X, 4], [X, X]]
    assert batch.prompt_lengths.tolist() == [0, 0]


def test_pair_weight_gives_the_mean_over_pairs_then_prompts():
    samples = [PreferenceSample([1], [[2]] * k, [(i, j) for i in range(k) for j in range(i + 1, k)])
               for k in (2, 3, 4)]
    batch = collate_preferences(samples, pad_token_id=0)
    rewards = torch.randn(batch.num_sequences, generator=torch.Generator().manual_seed(0))
    per_pair = -torch.nn.functional.logsigmoid(rewards[batch.better] - rewards[batch.worse])
    weighted = (batch.pair_weight * per_pair).sum()
    per_prompt = [per_pair[batch.pair_prompt == p].mean() for p in range(3)]
    assert weighted.item() == pytest.approx(torch.stack(per_prompt).mean().item(), rel=1e-6)
    assert batch.num_pairs == 1 + 3 + 6 and batch.num_sequences == 2 + 3 + 4


# ---------------------------------------------------------------------------------------
# Packing

def test_pack_rows_best_fit_decreasing():
    assert pack_rows([5, 3, 7, 2, 4], 8) == [[2], [0, 1], [3, 4]]
    lengths = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 9            # ceil(80 / 10) = 8 is the bound; BFD needs one more
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        pack_rows([3, 11], 10)


def test_collate_packed_positions_segments_and_labels():
    rows = [[sft([5, 6, 7], 1), sft([8, 9], 1)], [sft([10, 11, 12, 13], 2)]]
    batch = collate_packed(rows, pad_token_id=0, pad_to_multiple_of=3)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0]]
    assert batch.labels.tolist() == [[X, 6, 7, X, 9, X], [X, X, 12, 13, X, X]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
    assert batch.attention_mask is None and batch.packed
    assert (batch.num_label_tokens, batch.num_examples) == (5, 3)


def test_block_causal_mask():
    mask = block_causal_mask(torch.tensor([[1, 1, 2, 2, 0]]))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0],
                                         [0, 0, 1, 0, 0],
                                         [0, 0, 1, 1, 0],
                                         [0, 0, 0, 0, 1]]
    additive = block_causal_mask(torch.tensor([[1, 2]]), torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert additive[0, 0].tolist() == [[0.0, torch.finfo(torch.bfloat16).min],
                                       [torch.finfo(torch.bfloat16).min, 0.0]]


def _tiny_llama(attn_implementation):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


@pytest.mark.parametrize("attn,mask,dtype", [("sdpa", "4d", None),
                                             ("sdpa", "4d", torch.float32),
                                             ("sdpa", "position_ids", None),
                                             ("eager", "4d", torch.float32),
                                             ("eager", "position_ids", None)])
def test_packed_forward_matches_separate_forwards(attn, mask, dtype):
    model = _tiny_llama(attn)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 48, (n,), generator=g).tolist() for n in (5, 3, 7, 2, 4, 6)]
    samples = [sft(s, 1) for s in seqs]
    rows = [[samples[i] for i in row] for row in pack_rows([len(s) for s in seqs], 16)]
    batch = collate_packed(rows, pad_token_id=0)
    assert batch.input_ids.shape[1] <= 16 and len(rows) < len(seqs)
    with torch.no_grad():
        packed = model(**batch.model_inputs(mask, dtype)).logits
        unmasked = model(input_ids=batch.input_ids).logits
        assert torch.isfinite(packed).all()
        leaked = 0.0
        for r, row in enumerate(rows):
            start = 0
            for sample in row:
                alone = model(input_ids=torch.tensor([sample.input_ids])).logits[0]
                end = start + len(sample)
                torch.testing.assert_close(packed[r, start:end], alone, rtol=1e-5, atol=1e-5)
                leaked = max(leaked, (unmasked[r, start:end] - alone).abs().max().item())
                start = end
    assert leaked > 1e-3      # without the mask the samples do see each other


# ---------------------------------------------------------------------------------------
# Order and resumption

def test_sampler_is_deterministic_and_covers_every_unit_once_per_epoch():
    sampler = ResumableSampler([1] * 10, 3, seed=5, num_epochs=2)
    batches = list(sampler)
    assert len(batches) == 8 and len(sampler) == 4
    assert [len(b) for b in batches] == [3, 3, 3, 1, 3, 3, 3, 1]
    for epoch in (batches[:4], batches[4:]):
        assert sorted(i for b in epoch for i in b) == list(range(10))
    assert batches[:4] != batches[4:]                     # a new permutation each epoch
    assert list(ResumableSampler([1] * 10, 3, seed=5, num_epochs=2)) == batches
    assert list(ResumableSampler([1] * 10, 3, seed=6, num_epochs=2)) != batches
    unshuffled = list(ResumableSampler([1] * 5, 2, shuffle=False))
    assert unshuffled == [[0, 1], [2, 3], [4]]
    assert list(ResumableSampler([1] * 5, 2, shuffle=False, drop_last=True)) == [[0, 1], [2, 3]]


def test_length_bucketing_groups_similar_lengths():
    lengths = [1, 100, 2, 99, 3, 98, 4, 97, 5, 96, 6, 95, 7, 94, 8, 93]
    sampler = ResumableSampler(lengths, 4, seed=0, bucket_size=4)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(16))
    assert sorted(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                  for b in batches)[-1] <= 7
    assert batches == list(ResumableSampler(lengths, 4, seed=0, bucket_size=4))


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_continues_with_exactly_the_next_batch(drop_last):
    def sampler():
        return ResumableSampler([1] * 7, 2, seed=11, num_epochs=3, drop_last=drop_last)

    full = list(sampler())
    per_epoch = len(sampler())
    assert len(full) == 3 * per_epoch
    for cut in range(len(full) + 1):          # every point, the epoch boundaries included
        first = sampler()
        taken = [b for _, b in zip(range(cut), first)]
        state = first.state_dict()
        if cut % per_epoch == 0:
            assert (state["epoch"], state["position"]) == (cut // per_epoch, 0)
        resumed = sampler()
        resumed.load_state_dict(state)
        assert taken + list(resumed) == full, cut  # nothing repeated, nothing skipped


def test_resumed_loader_gives_the_same_batches():
    samples = [sft(list(range(3, 3 + n)), 1) for n in (2, 5, 3, 4, 6, 2, 3, 7, 4)]
    data = SFTDataset(samples, DataStats(), pad_token_id=0, max_length=8)

    def loader():
        return BatchLoader(data, 2, seed=3, num_epochs=2, packing=True)

    full = [b.input_ids.tolist() for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it).input_ids.tolist() for _ in range(len(first))]   # one whole epoch
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert head + [b.input_ids.tolist() for b in resumed] == full
    token_count = sum(b.num_label_tokens for b in loader())
    assert token_count == 2 * sum(len(s) - 1 for s in samples)
    other = BatchLoader(SFTDataset(samples[:4], DataStats(), 0, 8), 2)
    with pytest.raises(ValueError, match="saved for"):
        other.load_state_dict(first.state_dict())


def test_loader_over_preferences_keeps_a_prompts_pairs_together():
    samples = [PreferenceSample([1, k], [[2], [3], [4]][: 2 + k % 2], [(0, 1)]) for k in range(5)]
    data = PreferenceDataset(samples, DataStats(), pad_token_id=0, max_length=8)
    batches = list(BatchLoader(data, 2, seed=0))
    assert [b.num_prompts for b in batches] == [2, 2, 1]
    assert sum(b.num_pairs for b in batches) == 5
    for b in batches:
        assert (b.seq_prompt[b.better] == b.pair_prompt).all()
        assert (b.seq_prompt[b.worse] == b.pair_prompt).all()
    with pytest.raises(ValueError, match="only SFT data can be packed"):
        BatchLoader(data, 2, packing=True)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        ResumableSampler([1, 2], 0)
    with pytest.raises(ValueError, match="num_epochs"):
        ResumableSampler([1, 2], 1, num_epochs=0)
    with pytest.raises(ValueError, match="lengths"):
        ResumableSampler([], 1)
    with pytest.raises(ValueError, match="missing"):
        ResumableSampler([1, 2], 1).load_state_dict({"epoch": 0})
