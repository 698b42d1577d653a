"""Systems (b) and (c): transformers' `Trainer` + PEFT, the classic padded recipe and the recipe done well.

(b) "classic", what most tutorials show: every example padded to `max_length` when the data set is tokenized
    (`padding="max_length"`), `default_data_collator`.
(c) "done well": dynamic padding (`DataCollatorForSeq2Seq`, each batch to its longest row) and length grouping.

Both read the examples sequentially, laid out in lightning-peft's length-grouped order: Trainer's own
`group_by_length` sampler uses the same mega-batch algorithm, and this way (c) trains on exactly lightning-peft's
batches (and (b) on the same examples, padded further), so their losses must agree step for step. Gradient clipping is off and the optimizer is plain `adamw_torch`, as in the other systems.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from benchmarks.harness.common import load_plan, peft_model
from benchmarks.harness.data import plan_examples_in_order
from benchmarks.harness.recorder import IGNORE_INDEX, StepRecorder


def run(spec: dict[str, Any], recorder: StepRecorder) -> dict[str, Any]:
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, default_data_collator

    torch.manual_seed(spec["seed"])
    model = peft_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "right"
    examples = plan_examples_in_order(load_plan(spec)["padded"])
    if spec["padding"] == "max_length":
        dataset = [_padded(ids, labels, spec["max_length"], tokenizer.pad_token_id) for ids, labels in examples]
        collator = default_data_collator
    else:
        dataset = [
            {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels} for ids, labels in examples
        ]
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = RecordingTrainer(
        model=model,
        args=TrainingArguments(**training_arguments(spec)),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[StepEnd(recorder)],
    )
    trainer.recorder = recorder
    trainer.train()
    return {}


def _padded(ids: np.ndarray, labels: np.ndarray, max_length: int, pad_id: int) -> dict[str, list[int]]:
    """What `tokenizer(..., padding="max_length")` + labels -100 on the padding give for one example."""
    pad = max_length - len(ids)
    return {
        "input_ids": ids.tolist() + [pad_id] * pad,
        "attention_mask": [1] * len(ids) + [0] * pad,
        "labels": labels.tolist() + [IGNORE_INDEX] * pad,
    }


def training_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments shared by the Trainer and TRL systems (SFTConfig takes the same)."""
    return dict(
        output_dir=spec["workdir"],
        per_device_train_batch_size=spec["batch_size"],
        num_train_epochs=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        bf16=spec["precision"] == "bf16",
        use_cpu=spec["device"] == "cpu",
        seed=spec["seed"],
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


class RecordingTrainer(Trainer):
    """A `Trainer` over the examples in the prepared order that hands each step's batch and loss to the recorder."""

    recorder: StepRecorder

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Sampler:
        return SequentialSampler(self.train_dataset)

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.recorder.add(inputs, loss)
        return loss


class StepEnd(TrainerCallback):
    """Marks the end of each optimizer step (called by Trainer right after `optimizer.step()`)."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.recorder.total_steps = state.max_steps

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.recorder.end_step()
