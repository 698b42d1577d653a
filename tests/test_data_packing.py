"""Packing, padding and the length-grouped sampler; packed rows must give the model exactly what separate
examples give it (logits and summed losses)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import TINY_FORWARD, assert_close_reordered

from lightning_peft.data import (
    ExampleDataset,
    LengthGroupedSampler,
    PackedDataset,
    SFTCollator,
    first_fit_decreasing,
)
from lightning_peft.data.formats import render_records
from lightning_peft.data.readers import Records
from lightning_peft.data.tokenization import IGNORE_INDEX, TokenizedData, tokenize_rendered

MAX_LENGTH = 64


def naive_first_fit_decreasing(lengths, capacity):
    bins, free = [], []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[item]:
                bins[b].append(item)
                free[b] -= lengths[item]
                break
        else:
            bins.append([item])
            free.append(capacity - lengths[item])
    return bins


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    """Chat and prompt/completion examples of varied lengths, tokenized."""
    rng = random.Random(0)
    rows = []
    for i in range(12):
        answer = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 20)))
        if i % 2:
            rows.append({"prompt": f"Q{i}: " + "x" * rng.randint(0, 10), "completion": answer})
        else:
            turns = [{"role": "user", "content": "q" * rng.randint(1, 8)}, {"role": "assistant", "content": answer}]
            rows.append({"prompt": turns[:1], "completion": turns[1:]})
    records = Records(Path("train.jsonl"), rows)
    fmt, rendered = render_records(records, "prompt_completion", {}, tiny_tokenizer)
    return tokenize_rendered(rendered, tiny_tokenizer, MAX_LENGTH, fmt=fmt)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=request.param)
    return model.eval()


def test_first_fit_decreasing_small_case():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert first_fit_decreasing([], 8) == []
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([9], 8)


def test_first_fit_decreasing_matches_the_naive_algorithm():
    rng = random.Random(1)
    for _ in range(20):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 300))]
        bins = first_fit_decreasing(lengths, 64)
        assert bins == naive_first_fit_decreasing(lengths, 64)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 64 for b in bins)


def test_packed_rows_restart_positions_and_mask_each_first_label(examples):
    dataset = PackedDataset(examples, MAX_LENGTH)
    assert len(dataset) < len(examples)
    assert sum(len(dataset[i]["input_ids"]) for i in range(len(dataset))) == len(examples.input_ids)
    for i, row in enumerate(dataset.rows):
        item = dataset[i]
        assert len(item["input_ids"]) <= MAX_LENGTH
        start = 0
        for j in row:
            ids, labels = examples.example(j)
            end = start + len(ids)
            assert np.array_equal(item["input_ids"][start:end], ids)
            assert item["position_ids"][start:end].tolist() == list(range(len(ids)))
            assert item["labels"][start] == IGNORE_INDEX
            assert np.array_equal(item["labels"][start + 1 : end], labels[1:])
            start = end
    assert 0 < dataset.efficiency <= 1
    assert dataset.efficiency == pytest.approx(len(examples.input_ids) / (len(dataset) * MAX_LENGTH))


def test_padding_collator():
    items = [
        {"input_ids": np.array([5, 6, 7], np.int32), "labels": np.array([-100, 6, 7], np.int32)},
        {"input_ids": np.array([8], np.int32), "labels": np.array([-100], np.int32)},
    ]
    batch = SFTCollator(pad_token_id=0)(items)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packed_collator_has_positions_and_no_mask():
    items = [
        {
            "input_ids": np.array([5, 6, 7, 8, 9], np.int32),
            "labels": np.array([-100, 6, -100, 8, 9], np.int32),
            "position_ids": np.array([0, 1, 0, 1, 2], np.int32),
        },
        {"input_ids": np.array([3, 4], np.int32), "labels": np.array([-100, 4], np.int32), "position_ids": [0, 1]},
    ]
    batch = SFTCollator(pad_token_id=2)(items)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 2, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9], [-100, 4, -100, -100, -100]]
    # The padding is one more sequence starting at position 0.
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]


def _per_token_loss(logits, labels):
    """Summed cross-entropy over the supervised labels, HF-style shift, and the number of those labels."""
    shift_logits, shift_labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shift_labels != IGNORE_INDEX).sum())


@torch.no_grad()
def test_packed_logits_and_losses_equal_unpacked(tiny_model, examples, tiny_tokenizer):
    packed_set = PackedDataset(examples, MAX_LENGTH)
    items = [packed_set[i] for i in range(len(packed_set))]
    assert len({len(item["input_ids"]) for item in items}) > 1, "the batch must contain padding"
    batch = SFTCollator(tiny_tokenizer.pad_token_id)(items)
    packed_logits = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    for r, row in enumerate(packed_set.rows):
        start = 0
        for j in row:
            ids, _ = examples.example(j)
            alone = tiny_model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False).logits[0]
            assert_close_reordered(packed_logits[r, start : start + len(ids)], alone, **TINY_FORWARD)
            start += len(ids)

    unpacked_set = ExampleDataset(examples)
    unpacked = SFTCollator(tiny_tokenizer.pad_token_id)([unpacked_set[i] for i in range(len(unpacked_set))])
    unpacked_logits = tiny_model(
        input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"], use_cache=False
    ).logits
    packed_loss, packed_count = _per_token_loss(packed_logits, batch["labels"])
    unpacked_loss, unpacked_count = _per_token_loss(unpacked_logits, unpacked["labels"])
    assert packed_count == unpacked_count == int((examples.labels != IGNORE_INDEX).sum())
    # Per-token losses: the logits' difference, then a log-sum-exp over the vocabulary.
    assert_close_reordered(packed_loss, unpacked_loss, n_terms=len(tiny_tokenizer), sums_in_a_row=17)


def test_packing_masks_each_examples_first_label_whatever_the_input():
    # Labels where the first token is supervised (as a hand-made TokenizedData could have them): in a packed row
    # that label would be predicted from the previous example's last token, so packing must drop it.
    ids = np.array([10, 11, 12, 20, 21, 30, 31, 32, 33], np.int32)
    data = TokenizedData(
        input_ids=ids,
        loss_bits=np.packbits(np.ones(len(ids), bool)),
        offsets=np.array([0, 3, 5, 9]),
        record_index=np.arange(3),
        truncated=np.zeros(3, bool),
        dropped=np.zeros(0, np.int64),
        n_records=3,
        format="text",
    )
    dataset = PackedDataset(data, capacity=9)
    assert dataset.rows == [[2, 0, 1]]
    item = dataset[0]
    assert item["input_ids"].tolist() == [30, 31, 32, 33, 10, 11, 12, 20, 21]
    assert item["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert item["labels"].tolist() == [-100, 31, 32, 33, -100, 11, 12, -100, 21]
    assert data.labels.tolist() == ids.tolist(), "packing must not write into the shared arrays"


def test_length_grouped_sampler_is_deterministic_per_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(1, 500, size=1000)
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(1000))
    assert list(LengthGroupedSampler(lengths, batch_size=4, seed=3)) == first
    assert list(LengthGroupedSampler(lengths, batch_size=4, seed=4)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(1000))
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_length_grouped_sampler_groups_lengths_longest_first():
    lengths = np.random.default_rng(0).integers(1, 500, size=1000)
    order = list(LengthGroupedSampler(lengths, batch_size=4, seed=0))
    assert lengths[order[0]] == lengths.max()
    for chunk_start in range(0, 1000, 200):  # mega-chunks of batch_size * 50, each sorted longest first
        chunk = lengths[order[chunk_start + 1 : chunk_start + 200]]
        assert np.all(np.diff(chunk) <= 0)

    def padded_tokens(indices):
        batches = [lengths[indices[i : i + 4]] for i in range(0, len(indices), 4)]
        return sum(len(b) * b.max() for b in batches)

    shuffled = np.random.default_rng(0).permutation(1000)
    assert padded_tokens(order) < 0.7 * padded_tokens(shuffled)


def test_length_grouped_sampler_under_lightnings_distributed_wrapper():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    lengths = np.arange(1, 41)
    sampler = LengthGroupedSampler(lengths, batch_size=2, seed=0, mega_batch_mult=2)
    ranks = [DistributedSamplerWrapper(sampler, num_replicas=2, rank=r, shuffle=False) for r in range(2)]
    shares = [list(w) for w in ranks]
    assert sorted(shares[0] + shares[1]) == list(range(40))
    for wrapper in ranks:
        wrapper.set_epoch(1)  # forwarded to our sampler: a new order on every rank alike
    assert sampler.epoch == 1
    assert [list(w) for w in ranks] != shares
