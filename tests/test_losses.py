"""Chunked cross-entropy (`lightning_peft.losses`): the same loss, gradients and accuracy as the full logits."""

from __future__ import annotations

import pytest
import torch
from helpers import SGDPeftCausalLM, adapter_tensors, quiet_trainer, token_batches
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from tiny import build_model
from tolerance import assert_close_reordered, reordering_tolerance

from lightning_peft import PeftCausalLM
from lightning_peft.errors import ConfigError
from lightning_peft.losses import (
    _is_frozen_linear,
    chunked_lm_loss,
    chunking_blocker,
    next_token_cross_entropy,
    next_token_targets,
)

VOCAB = 259  # the tiny tokenizer's size


def tiny_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**build_model(VOCAB).config.to_dict(), **overrides})


def lora(model, **overrides):
    # Random B (init_lora_weights=False): every adapter tensor then gets a non-zero gradient.
    config = {"r": 4, "lora_dropout": 0.0, "init_lora_weights": False, "target_modules": "all-linear", **overrides}
    return get_peft_model(model, LoraConfig(**config))


def padded_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Three rows of 17 tokens: a masked prompt, one row right-padded (mask 0, label -100)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 17), generator=generator)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[:, :5] = -100
    mask[0, 12:], labels[0, 12:] = 0, -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def packed_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two rows, each three examples packed back to back (position_ids restart, no attention mask)."""
    ids = torch.randint(3, VOCAB, (2, 15), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, [0, 4, 9]] = -100  # each example's first token has no prediction from the previous example
    position_ids = torch.cat([torch.arange(4), torch.arange(5), torch.arange(6)]).repeat(2, 1)
    return {"input_ids": ids, "position_ids": position_ids}, labels


def reference_loss(model, inputs, labels) -> torch.Tensor:
    """The plain path: full logits, then torch's mean cross-entropy (what `PeftCausalLM.compute_loss` does)."""
    logits = model(**inputs, use_cache=False).logits[:, -labels.shape[1] :]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_loss_and_gradients(
    model, inputs, labels, chunk_size: int, grad_terms: int = VOCAB, grad_sums_in_a_row: int = 2
) -> None:
    """Chunked and full-logits losses agree, and so do all adapter gradients.

    The loss is a mean of log-sum-exps over the vocabulary: its terms are summed in another order per chunk. The
    gradients differ where the loss head's gradient (a sum over the vocabulary) is formed; the backward through
    the decoder then adds no new difference, only carries it (the same sums in the same order).
    """
    want = reference_loss(model, inputs, labels)
    want_grads = gradients(model, want)
    got = chunked_lm_loss(model, inputs, labels, chunk_size)
    got_grads = gradients(model, got.loss)
    n_supervised = int((labels[:, 1:] != -100).sum())
    assert_close_reordered(got.loss, want, n_terms=max(grad_terms, n_supervised), sums_in_a_row=2)
    assert got.n_tokens == n_supervised
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, f"{name} has no gradient: the test would prove nothing"
        assert_close_reordered(got_grads[name], grad, n_terms=grad_terms, sums_in_a_row=grad_sums_in_a_row, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 1000])  # 5 and 7 do not divide the 38 supervised tokens
def test_padded_batch_matches_the_full_logits(chunk_size):
    model = lora(build_model(VOCAB))
    # all-linear leaves the lm_head out: the frozen-linear path (gradients computed in forward)
    assert _is_frozen_linear(model.get_base_model().lm_head)
    inputs, labels = padded_batch()
    assert_same_loss_and_gradients(model, inputs, labels, chunk_size)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_trainable_lm_head_matches_the_full_logits(chunk_size):
    # modules_to_save wraps the lm_head in a trainable copy: the checkpointed path (recomputed in backward).
    model = lora(build_model(VOCAB), target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    assert not _is_frozen_linear(model.get_base_model().lm_head)
    inputs, labels = padded_batch()
    assert_same_loss_and_gradients(model, inputs, labels, chunk_size)
    assert any("lm_head.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_packed_batch_matches_the_full_logits():
    model = lora(build_model(VOCAB))
    inputs, labels = packed_batch()
    assert_same_loss_and_gradients(model, inputs, labels, chunk_size=4)


def test_tied_lm_head_matches_the_full_logits():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = lora(base)
    inputs, labels = padded_batch()
    assert_same_loss_and_gradients(model, inputs, labels, chunk_size=6)


def test_lora_on_the_lm_head_matches_the_full_logits():
    from peft.tuners.lora import Linear

    model = lora(build_model(VOCAB), target_modules=["q_proj", "v_proj", "lm_head"])
    assert isinstance(model.get_base_model().lm_head, Linear)
    assert not _is_frozen_linear(model.get_base_model().lm_head)
    inputs, labels = padded_batch()
    assert_same_loss_and_gradients(model, inputs, labels, chunk_size=6)
    assert any("lm_head.lora_B" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_qlora_matches_the_full_logits(tiny_model_dir, gradient_checkpointing):
    import bitsandbytes as bnb

    module = PeftCausalLM(
        str(tiny_model_dir),
        quantization="4bit",
        adapter={"r": 4, "lora_dropout": 0.0, "init_lora_weights": False},
        gradient_checkpointing=gradient_checkpointing,
    )
    module.configure_model()
    assert isinstance(module.model.get_base_model().model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    inputs, labels = padded_batch()
    assert_same_loss_and_gradients(module.model, inputs, labels, chunk_size=5)


@pytest.mark.parametrize(
    "config",
    [
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ],
    ids=["prompt_tuning", "prefix_tuning"],
)
def test_prompt_learning_matches_the_full_logits(config):
    # Prompt tuning prepends virtual tokens to the hidden states; the chunks keep the real positions only.
    model = get_peft_model(build_model(VOCAB), config)
    assert chunking_blocker(model) is None
    inputs, labels = padded_batch()
    assert_same_loss_and_gradients(model, inputs, labels, chunk_size=5)


def test_gemma2_logit_softcapping_is_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # small enough to change every logit
    )
    model = lora(Gemma2ForCausalLM(config))
    assert chunking_blocker(model) is None
    inputs, labels = padded_batch()
    assert_same_loss_and_gradients(model, inputs, labels, chunk_size=5)


def tiny_granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in tiny_config().to_dict().items() if k not in ("model_type", "architectures")}
    return GraniteForCausalLM(GraniteConfig(**fields, logits_scaling=4.0))


def test_logits_the_model_rescales_block_chunking():
    # Granite divides its logits by `logits_scaling` after the lm_head: chunks of lm_head(h) would be wrong.
    assert "logits are not lm_head(last hidden state)" in chunking_blocker(lora(tiny_granite()))


def test_no_supervised_token_gives_nan_and_zero_gradients_like_torch():
    model = lora(build_model(VOCAB))
    inputs, labels = padded_batch()
    labels[:] = -100
    want = reference_loss(model, inputs, labels)
    want_grads = gradients(model, want)
    got = chunked_lm_loss(model, inputs, labels, chunk_size=4)
    got_grads = gradients(model, got.loss)
    assert want.isnan() and got.loss.isnan()
    assert got.n_tokens == 0 and got.correct == 0
    for name, grad in want_grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(got_grads[name], grad), name


def test_shifting_the_labels_equals_slicing_the_logits():
    _, labels = padded_batch()
    logits = torch.randn(*labels.shape, VOCAB, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    (want_grad,) = torch.autograd.grad(want, logits)
    got = next_token_cross_entropy(logits, labels)
    (got_grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-7)
    targets = next_token_targets(labels)
    assert torch.equal(targets[:, :-1], labels[:, 1:]) and (targets[:, -1] == -100).all()


# ---- wired into PeftCausalLM ----------------------------------------------------------------------------------


def make_module(tiny_model_dir, module_class=PeftCausalLM, **kwargs) -> PeftCausalLM:
    kwargs.setdefault("adapter", {"r": 4, "lora_dropout": 0.0, "init_lora_weights": False})
    torch.manual_seed(0)  # the same random adapter in every module
    module = module_class(str(tiny_model_dir), save_adapter_on_fit_end=False, **kwargs)
    module.configure_model()
    return module


def step(module, batch) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """Loss, token accuracy (from the metric) and adapter gradients of one `_shared_step`."""
    module.train_acc.reset()
    loss = module._shared_step(batch, module.train_loss, module.train_acc)
    return loss.detach(), float(module.train_acc.compute()), gradients(module.model, loss)


def test_module_paths_agree_on_loss_accuracy_and_gradients(tiny_model_dir):
    chunked, plain = make_module(tiny_model_dir, loss_chunk_size=4), make_module(tiny_model_dir, loss_chunk_size=0)
    inputs, labels = padded_batch()
    # Labels do not change the logits: make half of the supervised targets the model's own argmax, so the
    # accuracy is about 1/2 rather than the ~0 of random targets.
    with torch.no_grad():
        predicted = plain.model(**inputs, use_cache=False).logits[:, :-1].argmax(-1)
    labels[:, 1::2] = torch.where(labels[:, 1::2] != -100, predicted[:, ::2], -100)
    batch = {**inputs, "labels": labels}
    got, want = step(chunked, batch), step(plain, batch)
    assert chunked._chunked_loss_ok and not plain._uses_chunked_loss()
    assert_close_reordered(got[0], want[0], n_terms=VOCAB, sums_in_a_row=2)
    assert 0.3 < want[1] < 0.7 and got[1] == want[1]
    for name, grad in want[2].items():
        assert_close_reordered(got[2][name], grad, n_terms=VOCAB, sums_in_a_row=2, msg=name)


def test_a_compute_loss_override_still_receives_full_logits(tiny_model_dir):
    seen = []

    class Recording(PeftCausalLM):
        def compute_loss(self, logits, labels, batch):
            seen.append(logits.shape)
            return super().compute_loss(logits, labels, batch)

    module = Recording(str(tiny_model_dir), adapter={"r": 4}, loss_chunk_size=4, save_adapter_on_fit_end=False)
    module.configure_model()
    inputs, labels = padded_batch()
    module._shared_step({**inputs, "labels": labels}, module.train_loss, module.train_acc)
    assert seen == [torch.Size([3, 17, VOCAB])] and not module._uses_chunked_loss()


def test_a_model_that_blocks_chunking_falls_back_to_full_logits(tiny_model_dir):
    class GraniteLM(PeftCausalLM):
        def load_base_model(self):
            return tiny_granite()

    chunked = GraniteLM(str(tiny_model_dir), adapter={"r": 4, "lora_dropout": 0.0}, loss_chunk_size=4)
    chunked.configure_model()
    inputs, labels = padded_batch()
    batch = {**inputs, "labels": labels}
    loss = chunked._shared_step(batch, chunked.train_loss, chunked.train_acc)
    assert chunked._chunked_loss_ok is False
    assert_close_reordered(loss, reference_loss(chunked.model, inputs, labels), n_terms=VOCAB)


def test_training_with_chunks_gives_the_same_adapter_and_metrics(tiny_model_dir, tmp_path):
    adapters, metrics = [], []
    for chunk_size in (3, 0):
        module = make_module(tiny_model_dir, SGDPeftCausalLM, loss_chunk_size=chunk_size, learning_rate=1e-2)
        trainer = quiet_trainer(tmp_path, max_steps=3)
        trainer.fit(module, train_dataloaders=token_batches(vocab=VOCAB))
        adapters.append(adapter_tensors(module))
        metrics.append(trainer.validate(module, token_batches(n_batches=2, vocab=VOCAB), verbose=False)[0])
    (chunked, plain), (chunked_metrics, plain_metrics) = adapters, metrics
    # 3 SGD steps, each gradient as in the test above (momentum weights 1.75 + 1.5 + 1 < 5); the validation
    # metrics then add one more such difference.
    bound = reordering_tolerance(VOCAB, sums_in_a_row=5 * 2)
    for key, tensor in plain.items():
        assert_close_reordered(chunked[key], tensor, n_terms=VOCAB, sums_in_a_row=5 * 2, msg=key)
    assert chunked_metrics.keys() == plain_metrics.keys() == {"val_loss", "val_ppl", "val_acc"}
    for key, value in plain_metrics.items():
        assert abs(chunked_metrics[key] - value) <= 2 * bound * max(1.0, abs(value)), key


def test_a_negative_chunk_size_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"`loss_chunk_size`=-1 must be >= 0 \(0 or null: no chunking\)"):
        PeftCausalLM(str(tiny_model_dir), loss_chunk_size=-1)


@pytest.mark.slow
def test_smollm2_chunked_loss_matches_the_full_logits(smollm2_dir):
    module = PeftCausalLM(
        str(smollm2_dir), adapter={"r": 8, "lora_dropout": 0.0, "init_lora_weights": False}, loss_chunk_size=64
    )
    module.configure_model()
    ids = torch.randint(3, 49152, (2, 96), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :20] = -100
    # The two paths sum the loss head's gradient over the 49152-token vocabulary in other orders (and the BLAS may
    # pick other kernels for the chunks' shapes); 30 layers then carry that difference back to each adapter.
    assert_same_loss_and_gradients(
        module.model, {"input_ids": ids}, labels, chunk_size=64, grad_terms=49152, grad_sums_in_a_row=2
    )
