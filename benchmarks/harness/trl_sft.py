"""System (d): TRL's `SFTTrainer` with packing (its default best-fit-decreasing packing, padding-free batches).

TRL gets the same tokenized examples (ids and labels, so the same tokens carry the loss) in file order and does
the rest itself: it packs them into rows of `max_length`, shuffles the rows, flattens each batch into one
padding-free sequence with restarting position ids, and computes the loss with its fused, chunked LM head. Its
batches are its own, so its losses are not compared step by step; its final loss and speed are.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness.common import load_base, load_plan, lora_config
from benchmarks.harness.hf_trainer import StepEnd, training_arguments
from benchmarks.harness.recorder import StepRecorder


def run(spec: dict[str, Any], recorder: StepRecorder) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    class RecordingSFTTrainer(SFTTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(model, inputs, *args, **kwargs)
            recorder.add(inputs, loss)
            return loss

    torch.manual_seed(spec["seed"])
    examples = load_plan(spec)["examples"]
    dataset = Dataset.from_list([{"input_ids": ids.tolist(), "labels": labels.tolist()} for ids, labels in examples])
    model = load_base(spec)
    trainer = RecordingSFTTrainer(
        model=model,
        args=SFTConfig(**training_arguments(spec), packing=True, max_length=spec["max_length"]),
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        peft_config=lora_config(),
        callbacks=[StepEnd(recorder)],
    )
    trainer.train()
    return {"trl_packing_strategy": trainer.args.packing_strategy}
