"""Chunked next-token cross-entropy: the loss without the (batch, time, vocab) logits.

The default loss path asks the model for all logits, which at 8 x 512 tokens and a 49k vocabulary is 805 MB in
fp32, plus a flattened copy, the log-softmax kept for backward and the gradient of each. Here the model runs with
`logits_to_keep=1` (its lm_head sees one position), the final hidden states are taken from the decoder with a
forward hook, and the lm_head runs on the supervised positions only, a chunk of tokens at a time, so only one
chunk of logits exists at any time:

- a frozen `nn.Linear` lm_head (the usual case: LoRA's `all-linear` leaves it out; tied embeddings; QLoRA keeps
  it unquantized): each chunk's gradient with respect to the hidden states is computed in the forward pass
  (softmax minus one-hot, times the weight) and kept, a (tokens, hidden) tensor; backward only scales it. No
  logits are recomputed, so this costs no more arithmetic than the full logits.
- any other lm_head (a LoRA target, trainable, another module type) is called as a module under
  `torch.utils.checkpoint`, chunk by chunk: the logits are freed after forward and recomputed in backward.

`chunking_blocker` says when this cannot stand in for the model's logits; the caller then keeps the plain path.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from lightning_peft.labels import IGNORE_INDEX


@dataclass
class TokenLoss:
    """Mean cross-entropy over the supervised tokens, their count and how many the argmax predicts."""

    loss: torch.Tensor
    n_tokens: torch.Tensor
    correct: torch.Tensor


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target: the next label, -100 after the last position.

    Loss code that pairs `logits[:, t]` with `next_token_targets(labels)[:, t]` never slices the logits: the slice
    `logits[:, :-1]` is not contiguous, so flattening it copies every logit (200 MB for SmolLM2 at 4 x 256 tokens,
    ~0.2 s per step on a CPU). transformers' own loss shifts the labels for the same reason.

    Args:
        labels: (batch, time) target ids, not shifted; -100 marks tokens without loss.
    """
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` (batch, time, vocab) against the next tokens of `labels`, in fp32.

    Equal to `cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)`, without copying the logits.
    """
    targets = next_token_targets(labels).flatten()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX)


def chunked_lm_loss(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, chunk_size: int
) -> TokenLoss:
    """Next-token cross-entropy of `model` on `inputs`, computed `chunk_size` supervised tokens at a time.

    Equal to `cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)` on the model's full logits, NaN
    (with zero gradients) like it when no token is supervised.

    Args:
        model: a (PEFT-wrapped) causal LM that `chunking_blocker` accepts.
        inputs: model inputs (`input_ids`, `attention_mask`, `position_ids` ...), passed on unchanged.
        labels: (batch, time) target ids, not shifted; -100 marks tokens without loss.
        chunk_size: supervised tokens per lm_head call.
    """
    base = _base_model(model)
    with _captured_output(base.get_decoder()) as captured:
        model(**inputs, use_cache=False, logits_to_keep=1)
    # Prompt tuning prepends virtual tokens: keep the positions of the real ones (as the plain path does).
    hidden = _last_hidden_state(captured[0])[:, -labels.shape[1] :]
    return chunked_cross_entropy(hidden, labels, base.get_output_embeddings(), chunk_size, softcap=_softcap(base))


def chunked_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    chunk_size: int,
    softcap: float | None = None,
) -> TokenLoss:
    """Next-token cross-entropy of `lm_head(hidden)`, computed on supervised positions, `chunk_size` at a time.

    Args:
        hidden: (batch, time, hidden) final hidden states, aligned with `labels`.
        labels: (batch, time) target ids, not shifted; -100 marks tokens without loss.
        lm_head: the output layer, called as a module (tied, LoRA-wrapped or trainable alike).
        chunk_size: supervised tokens per lm_head call.
        softcap: Gemma 2's `final_logit_softcapping`, applied to the logits as the model does.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][supervised], targets[supervised]
    n_tokens = supervised.sum()
    if len(targets) == 0:  # torch's mean over no targets is NaN; its gradient is zero
        return TokenLoss(hidden.sum() * 0 + float("nan"), n_tokens, n_tokens.clone())
    if _is_frozen_linear(lm_head):
        total, correct = _FrozenLinearCrossEntropy.apply(
            hidden, lm_head.weight, lm_head.bias, targets, chunk_size, softcap
        )
        return TokenLoss(total / n_tokens, n_tokens, correct)
    step = functools.partial(_chunk_loss, lm_head, softcap)
    if len(targets) <= chunk_size:  # one chunk: nothing to gain from recomputing it
        total, correct = step(hidden, targets)
    else:
        parts = [
            checkpoint(step, h, t, use_reentrant=False)
            for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True)
        ]
        total = torch.stack([loss for loss, _ in parts]).sum()
        correct = torch.stack([c for _, c in parts]).sum()
    return TokenLoss(total / n_tokens, n_tokens, correct)


def chunking_blocker(model: torch.nn.Module, device: Any = None) -> str | None:
    """Why `chunked_lm_loss` cannot replace `model`'s logits (None when it can).

    Beyond the structure (a decoder, a separate lm_head, `logits_to_keep`), it checks the arithmetic: on a few
    random tokens the logits rebuilt from the decoder's output must equal the model's own. That catches models
    that scale or cap their logits in a way this module does not reproduce.
    """
    from torch.distributed.tensor import DTensor

    base = _base_model(model)
    lm_head = base.get_output_embeddings()
    if lm_head is None:
        return f"{type(base).__name__} has no separate lm_head (get_output_embeddings() is None)"
    if any(isinstance(p, DTensor) for p in lm_head.parameters()):
        # FSDP2 reshards the root's weights when the model's forward returns, before the chunks would use them.
        return "the lm_head is FSDP2-sharded and would run outside the root module's forward"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no `logits_to_keep`"
    decoder = base.get_decoder()
    if decoder is base:
        return f"{type(base).__name__} has no separate decoder (get_decoder() returns the model itself)"
    rebuilt, logits = _logits_both_ways(model, base, decoder, device)
    if rebuilt is None or rebuilt.shape != logits.shape:
        return f"the output of {type(decoder).__name__} is not the input of {type(base).__name__}'s lm_head"
    scale = logits.abs().max().clamp(min=1e-6)
    if not torch.allclose(rebuilt, logits, rtol=1e-3, atol=1e-3 * float(scale)):
        return f"{type(base).__name__}'s logits are not lm_head(last hidden state)"
    return None


class _FrozenLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy and correct-argmax count of `linear(hidden, weight, bias)`, chunk by chunk.

    The weight gets no gradient (the caller checks that it is frozen); the hidden states' gradient is computed
    in forward while each chunk's logits exist, so backward needs neither the logits nor a recomputation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):
        needs_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        correct = targets.new_zeros(())
        for start in range(0, len(targets), chunk_size):
            chunk = slice(start, start + chunk_size)
            # A function per chunk: its logits are freed on return, before the next chunk's are allocated.
            loss, right = _frozen_linear_chunk(
                hidden[chunk],
                targets[chunk],
                weight,
                bias,
                softcap,
                None if grad_hidden is None else grad_hidden[chunk],
            )
            total += loss
            correct += right
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(grad_hidden)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def _frozen_linear_chunk(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    grad_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and correct-argmax count of one chunk; writes d(loss)/d(hidden) into `grad_out`."""
    raw = torch.nn.functional.linear(hidden, weight, bias)
    capped = torch.tanh(raw / softcap) if softcap is not None else None
    logits = (raw if capped is None else capped * softcap).float()
    correct = (logits.argmax(-1) == targets).sum()
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    # logsumexp as torch computes it (max + log of the sum of exp(x - max)), but in the logits' own buffer: one
    # chunk-sized buffer instead of three, and the exponentials are the softmax's numerators.
    peak = logits.amax(-1, keepdim=True)
    numerators = logits.sub_(peak).exp_()
    sums = numerators.sum(-1)
    loss = (sums.log() + peak.squeeze(1) - target_logits).sum()
    if grad_out is not None:
        # d(sum of losses)/d(logits) = softmax - one_hot, still in the same buffer.
        grad = numerators.div_(sums[:, None])
        grad[torch.arange(len(targets), device=targets.device), targets] -= 1
        if capped is not None:  # d(cap * tanh(x / cap))/dx = 1 - tanh(x / cap)^2
            grad *= 1 - capped.float().square()
        grad_out.copy_(grad.to(weight.dtype) @ weight)  # copy_ casts where hidden and weight dtypes differ
    return loss, correct


def _is_frozen_linear(module: torch.nn.Module) -> bool:
    """A plain `nn.Linear` (not a LoRA or bitsandbytes subclass) whose parameters take no gradient."""
    return type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters())


def _chunk_loss(
    lm_head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and correct-argmax count of one chunk (logits in fp32, like the plain path)."""
    logits = _logits(lm_head, softcap, hidden).float()
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, (logits.argmax(-1) == targets).sum()


def _logits(lm_head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden)
    if softcap is not None:  # Gemma 2: applied by the model after its lm_head, in the model's dtype
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _logits_both_ways(
    model: torch.nn.Module, base: torch.nn.Module, decoder: torch.nn.Module, device: Any
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Logits of 6 random tokens as the model returns them and as rebuilt from its decoder (eval mode)."""
    vocab = base.get_input_embeddings().weight.shape[0]  # PEFT wrappers (trainable tokens) have no num_embeddings
    input_ids = torch.randint(vocab, (1, 6), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _captured_output(decoder) as captured:
            logits = model(input_ids=input_ids, use_cache=False).logits
            if not captured:
                return None, logits
            rebuilt = _logits(base.get_output_embeddings(), _softcap(base), _last_hidden_state(captured[0]))
    finally:
        model.train(was_training)
    return rebuilt.float(), logits.float()


@contextmanager
def _captured_output(module: torch.nn.Module) -> Iterator[list[Any]]:
    """Collect `module`'s forward output while the context is open (the hook is removed on exit)."""
    outputs: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def _last_hidden_state(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (adapter layers injected in place), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _softcap(base: torch.nn.Module) -> float | None:
    config = base.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "final_logit_softcapping", None)
