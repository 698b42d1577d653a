"""`SmoothedZLossLM`: `PeftCausalLM` trained with label smoothing and a z-loss.

The only hook overridden is `compute_loss`; loading, adapters, optimizers and adapter saving are inherited.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from lightning_peft import ConfigError, PeftCausalLM
from lightning_peft.losses import next_token_targets

IGNORE_INDEX = -100


class SmoothedZLossLM(PeftCausalLM):
    """Fine-tune with label-smoothed cross-entropy plus a z-loss on the softmax normalizer.

    Label smoothing moves `label_smoothing` of each target's probability mass onto the whole vocabulary, which
    keeps a small adapter from making the model over-confident on a small data set. The z-loss
    (PaLM, ST-MoE) adds `z_loss_weight * mean(logsumexp(logits) ** 2)` over the supervised tokens and keeps
    the logits from drifting to large magnitudes.

    Both apply to training only: validation (and `evaluate`) keep the plain cross-entropy, so `val_loss` and
    `val_ppl` stay comparable with runs of the base class. The z-loss term is logged as `train_z_loss`.

    Args:
        label_smoothing: Fraction of the target probability spread over the vocabulary, in [0, 1).
        z_loss_weight: Weight of the z-loss term; 0 turns it off.
        **kwargs: Every `PeftCausalLM` argument (model_name_or_path, adapter, learning_rate ...).
    """

    def __init__(self, label_smoothing: float = 0.1, z_loss_weight: float = 1.0e-4, **kwargs: Any) -> None:
        problems = []
        if not 0 <= label_smoothing < 1:
            problems.append(f"`label_smoothing`={label_smoothing!r} must be in [0, 1)")
        if z_loss_weight < 0:
            problems.append(f"`z_loss_weight`={z_loss_weight!r} must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems) + ".")
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing
        self.z_loss_weight = z_loss_weight

    @override
    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.model.training:  # validation and evaluate(): the plain loss of the base class
            return super().compute_loss(logits, labels, batch)
        logits = logits.flatten(0, 1).float()
        targets = next_token_targets(labels).flatten()  # shifts the labels, so the logits are not copied
        loss = torch.nn.functional.cross_entropy(
            logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing
        )
        supervised = targets != IGNORE_INDEX
        z_loss = torch.logsumexp(logits[supervised], dim=-1).pow(2).mean()
        if self._trainer is not None and self.trainer.training:  # not when called outside the fit loop
            self.log("train_z_loss", z_loss.detach(), batch_size=labels.shape[0])
        return loss + self.z_loss_weight * z_loss
