"""bf16-mixed on the CPU trains like fp32: 50 steps' loss curves within what bf16 rounding explains."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from helpers import quiet_trainer
from tolerance import TINY_FORWARD, unit_roundoff
from torch.utils.data import DataLoader

from lightning_peft import PeftCausalLM

STEPS = 50


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _counting_batches() -> DataLoader:
    """Rows that count up from a random start (5 batches of 4 x 16 tokens): a rule the adapter learns quickly."""
    starts = torch.randint(3, 200, (20, 1), generator=torch.Generator().manual_seed(0))
    ids = starts + torch.arange(16)
    return DataLoader([{"input_ids": b, "labels": b.clone()} for b in ids.split(4)], batch_size=None)


def _loss_curve(tiny_model_dir, tmp_path, precision: str) -> tuple[list[float], PeftCausalLM]:
    L.seed_everything(0)
    module = PeftCausalLM(
        str(tiny_model_dir),
        adapter={"r": 16, "lora_alpha": 64},
        learning_rate=1e-2,
        lr_scheduler="constant",
        save_adapter_on_fit_end=False,
    )
    losses = _Losses()
    trainer = quiet_trainer(tmp_path / precision, max_epochs=STEPS // 5, precision=precision, callbacks=[losses])
    trainer.fit(module, train_dataloaders=_counting_batches())
    return losses.losses, module


def test_bf16_mixed_loss_curve_follows_fp32(tiny_model_dir, tmp_path):
    fp32, module = _loss_curve(tiny_model_dir, tmp_path, "32-true")
    bf16, _ = _loss_curve(tiny_model_dir, tmp_path, "bf16-mixed")
    assert len(fp32) == len(bf16) == STEPS
    # Under bf16 autocast every matmul rounds its two inputs and its output to bf16 (8-bit mantissa, unit roundoff
    # u = 2^-9 ... 2^-8): about 3u relative per op, and a logit comes out of TINY_FORWARD's ops in a row. The loss
    # (log-sum-exp minus the target logit) moves by at most twice the largest logit change.
    with torch.no_grad():
        logits = module.model(input_ids=next(iter(_counting_batches()))["input_ids"]).logits
    per_op = 3 * unit_roundoff(torch.bfloat16)
    tolerance = 2 * TINY_FORWARD["sums_in_a_row"] * per_op * logits.abs().max().item()
    gaps = [abs(a - b) for a, b in zip(bf16, fp32, strict=True)]
    assert max(gaps) <= tolerance, f"bf16-mixed left fp32's curve by {max(gaps):.4f} > {tolerance:.4f}: {gaps}"
    # It could fail: a bf16 run that learned nothing would end further than that from fp32's curve.
    assert fp32[0] - fp32[-1] > tolerance
