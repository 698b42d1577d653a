"""Per-document attention for packed rows (`lightning_peft.packed_attention`): the same logits and gradients as
each example alone, nothing of size (T x T) kept for backward, used by fit on packed data, and the cases where it
must step aside (eager models, prompt learning, padding masks, KV caches, sliding windows shorter than a document).
"""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from tiny_families import FAMILIES, build_family_model
from tolerance import TINY_FORWARD, assert_close_reordered
from torch.utils.data import DataLoader

from lightning_peft import PeftCausalLM, packed_attention
from lightning_peft.packed_attention import PACKED_ATTENTION, document_plan, use_packed_attention

# Four examples and the collator's padding (positions restarting at 0 after the last example): 40 tokens a row.
LENGTHS = (7, 13, 1, 12)
ROW = 40
# Sums of a gradient run over every token of the batch, after the forward's chain and as long a backward chain.
TINY_BACKWARD = {"n_terms": 2 * ROW * 64, "sums_in_a_row": 2 * TINY_FORWARD["sums_in_a_row"]}


def packed_rows(vocab: int, rows: int = 2, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """A packed batch (the examples differ between rows) and its examples, each as a (1, L) tensor."""
    generator = torch.Generator().manual_seed(seed)
    padding = ROW - sum(LENGTHS)
    ids, positions, examples = [], [], []
    for _ in range(rows):
        row = [torch.randint(3, vocab, (n,), generator=generator) for n in LENGTHS]
        examples += [x[None] for x in row]
        ids.append(torch.cat([*row, torch.zeros(padding, dtype=torch.long)]))
        positions.append(torch.cat([torch.arange(n) for n in (*LENGTHS, padding)]))
    labels = torch.stack(ids).clone()
    labels[:, sum(LENGTHS) :] = -100
    return {"input_ids": torch.stack(ids), "position_ids": torch.stack(positions), "labels": labels}, examples


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy within each example (the last token of each predicts nothing)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def packed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels = batch["labels"].clone()
    starts = torch.cumsum(torch.tensor((0, *LENGTHS[:-1])), 0)
    labels[:, starts] = -100  # an example's first token is not predicted from the previous example
    return logits, summed_loss(logits, labels)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_logits_and_gradients_equal_each_example_alone(family):
    model = build_family_model(family)
    assert use_packed_attention(model) and model.config._attn_implementation == PACKED_ATTENTION
    batch, examples = packed_rows(model.config.vocab_size)
    logits, loss = packed_loss(model, batch)
    loss.backward()
    packed_grads = gradients(model)

    alone = [model(input_ids=x, use_cache=False).logits for x in examples]
    sum(summed_loss(out, x) for out, x in zip(alone, examples, strict=True)).backward()
    alone_grads = gradients(model)

    starts = torch.cumsum(torch.tensor((0, *LENGTHS)), 0)
    for i, out in enumerate(alone):
        row, k = divmod(i, len(LENGTHS))
        assert_close_reordered(logits[row : row + 1, starts[k] : starts[k + 1]], out, **TINY_FORWARD)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        assert_close_reordered(grad, alone_grads[name], **TINY_BACKWARD, msg=name)


def test_per_document_attention_equals_the_masked_sdpa_path_and_is_what_runs(monkeypatch):
    model = build_family_model("llama")
    batch, _ = packed_rows(model.config.vocab_size)
    masked, _ = packed_loss(model, batch)  # transformers' sdpa with its block-diagonal mask
    calls = []
    per_document = packed_attention._per_document
    monkeypatch.setattr(packed_attention, "_per_document", lambda *a: calls.append(1) or per_document(*a))
    use_packed_attention(model)
    calls.clear()  # the switch's own isolation check attends per document too
    ours, _ = packed_loss(model, batch)
    assert len(calls) == model.config.num_hidden_layers
    assert_close_reordered(ours, masked, **TINY_FORWARD)


def saved_shapes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for backward during one training forward pass."""
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        packed_loss(model, batch)
    return shapes


def test_nothing_of_size_t_by_t_is_saved_for_backward():
    model = build_family_model("llama")
    model.train()
    batch, _ = packed_rows(model.config.vocab_size)
    assert ROW not in (model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size)
    quadratic = [s for s in saved_shapes(model, batch) if s[-2:] == (ROW, ROW)]
    assert quadratic, "the masked sdpa path saves its (T x T) mask: the census must see it"
    use_packed_attention(model)
    assert [s for s in saved_shapes(model, batch) if s[-2:] == (ROW, ROW)] == []


def test_document_plan_groups_documents_by_length_and_restores_token_order():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    plan = document_plan(positions, batch_size=2)
    assert {length: index.tolist() for length, index in plan.groups} == {
        1: [[5]],
        2: [[3, 4], [6, 7]],
        3: [[0, 1, 2]],
        4: [[8, 9, 10, 11]],
    }
    gathered = torch.cat([index.flatten() for _, index in plan.groups])
    assert gathered[plan.order].tolist() == list(range(12))  # every token back in its place
    assert plan.longest == 4 and plan.doc_ids.tolist() == [[1, 1, 1, 2, 2, 3], [1, 1, 2, 2, 2, 2]]
    assert document_plan(torch.arange(6)[None], batch_size=3) is None  # one document per row: plain causal


def test_padding_masks_and_generation_go_through_sdpa_unchanged():
    model = build_family_model("llama").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        generated = model.generate(ids[1:, :5], max_new_tokens=4, do_sample=False)
        use_packed_attention(model)
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(model.generate(ids[1:, :5], max_new_tokens=4, do_sample=False), generated)
    assert_close_reordered(got, want, **TINY_FORWARD)


@pytest.mark.parametrize("window", [16, 8], ids=["documents-within-window", "window-cuts-documents"])
def test_sliding_window_models_keep_their_window(window, monkeypatch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = FAMILIES["mistral"]()
    config.sliding_window = window
    model = AutoModelForCausalLM.from_config(config)
    batch, _ = packed_rows(model.config.vocab_size)
    want, _ = packed_loss(model, batch)  # transformers' sdpa: block-diagonal and sliding mask
    calls = []
    per_document = packed_attention._per_document
    monkeypatch.setattr(packed_attention, "_per_document", lambda *a: calls.append(1) or per_document(*a))
    use_packed_attention(model)
    calls.clear()
    got, _ = packed_loss(model, batch)
    assert_close_reordered(got, want, **TINY_FORWARD)
    assert bool(calls) == (window >= max(LENGTHS))  # a cut document takes the exact (quadratic) mask instead


def test_eager_models_and_prompt_learning_keep_their_attention(tiny_model_dir):
    gemma2 = build_family_model("gemma2")  # eager only (softcapping)
    assert not use_packed_attention(gemma2) and gemma2.config._attn_implementation == "eager"
    assert packed_attention.packed_attention_blocker(gemma2) == "it runs 'eager' attention, not sdpa"
    prompt = PeftCausalLM(
        str(tiny_model_dir),
        adapter={"class_path": "PromptTuningConfig", "init_args": {"num_virtual_tokens": 2}},
        save_adapter_on_fit_end=False,
    )
    prompt.configure_model()
    assert not prompt.use_packed_attention()
    assert prompt.model.get_base_model().config._attn_implementation == "sdpa"


def test_a_model_that_would_mix_packed_examples_is_switched_back(monkeypatch):
    model = build_family_model("llama")
    monkeypatch.setattr(packed_attention, "packed_examples_are_isolated", lambda *a, **k: False)
    assert not use_packed_attention(model) and model.config._attn_implementation == "sdpa"


class PackedData(L.LightningDataModule):
    """Two packed batches, flagged as packing the way `SFTDataModule(packing=True)` is."""

    packing = True

    def train_dataloader(self) -> DataLoader:
        batches = [packed_rows(259, seed=seed)[0] for seed in (0, 1)]
        return DataLoader(batches, batch_size=None)


def test_fit_on_packed_data_switches_to_per_document_attention(tiny_model_dir, tmp_path, monkeypatch):
    lengths = []  # of the rows attended per document
    per_document = packed_attention._per_document
    monkeypatch.setattr(packed_attention, "_per_document", lambda *a: lengths.append(a[1].shape[2]) or per_document(*a))
    module = PeftCausalLM(str(tiny_model_dir), adapter={"r": 4}, save_adapter_on_fit_end=False)
    quiet_trainer(tmp_path, max_steps=2).fit(module, datamodule=PackedData())
    assert module.model.get_base_model().config._attn_implementation == PACKED_ATTENTION
    assert lengths.count(ROW) == 2 * 2  # two training steps, two layers (the isolation checks use shorter rows)
