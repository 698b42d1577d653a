"""The systems compared, and which of them train on identical batches (their losses must agree step by step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class System:
    """One way to fine-tune.

    Attributes:
        name: the key in the results.
        runner: the harness module that trains it.
        label: what it is, for the table.
        packing: trains on packed rows rather than padded examples.
        quantization: "4bit" for QLoRA.
        padding: "max_length" for the classic recipe, else each batch to its longest row.
        group: systems of one group train on the same examples in the same batches (None: its own batches).
        model_options: extra `model:` settings of a lightning-peft system.
        trainer_options: extra `trainer:` settings of a lightning-peft system.
        model_class: the `model.class_path` of a lightning-peft system, when not `PeftCausalLM`.
        env: environment variables of its worker process, over the harness's own.
        default: run it unless `--systems` says otherwise.
    """

    name: str
    runner: str
    label: str
    packing: bool
    quantization: str = "none"
    padding: str = "dynamic"
    group: str | None = None
    model_options: tuple[tuple[str, Any], ...] = ()
    trainer_options: tuple[tuple[str, Any], ...] = ()
    model_class: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    default: bool = True


SYSTEMS: tuple[System, ...] = (
    System("raw-lora-padded", "raw", "(a) PyTorch + PEFT loop, padded batches", False, group="lora-padded"),
    System(
        "hf-classic",
        "hf_trainer",
        "(b) Trainer + PEFT, padding=max_length",
        False,
        padding="max_length",
        group="lora-padded",
    ),
    System(
        "hf-dynamic", "hf_trainer", "(c) Trainer + PEFT, dynamic padding + length grouping", False, group="lora-padded"
    ),
    System("lpeft-lora-padded", "lpeft", "(e) lightning-peft LoRA, packing off", False, group="lora-padded"),
    System("raw-lora-packed", "raw", "(a) PyTorch + PEFT loop, packed batches", True, group="lora-packed"),
    System("trl-packed", "trl_sft", "(d) TRL SFTTrainer, packing (bfd, padding-free)", True),
    System("lpeft-lora-packed", "lpeft", "(e) lightning-peft LoRA, packing on", True, group="lora-packed"),
    # The framework alone: the raw loop's loss (from the full logits) instead of lightning-peft's chunked one.
    System(
        "lpeft-lora-packed-full-logits",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, loss from the full logits (loss_chunk_size: 0)",
        True,
        group="lora-packed",
        model_options=(("loss_chunk_size", 0),),
        default=False,
    ),
    # Before per-document attention: transformers' sdpa with its block-diagonal (T x T) mask on packed rows.
    System(
        "lpeft-lora-packed-sdpa-mask",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, attn_implementation: sdpa (a (T x T) mask per packed row)",
        True,
        group="lora-packed",
        model_options=(("attn_implementation", "sdpa"),),
        default=False,
    ),
    System(
        "lpeft-lora-packed-raw-loss",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, with the raw loop's loss and no metrics: the framework alone",
        True,
        group="lora-packed",
        model_class="benchmarks.harness.lpeft.RawLossLM",
        default=False,
    ),
    # Memory modes of the same run (`gradient_checkpointing`): compare with lpeft-lora-packed (false).
    *(
        System(
            f"lpeft-lora-packed-ckpt-{name}",
            "lpeft",
            f"(e) lightning-peft LoRA, packing on, gradient_checkpointing: {name}",
            True,
            group="lora-packed",
            model_options=(("gradient_checkpointing", value),),
            default=False,
        )
        for name, value in (("selective", "selective"), ("true", True))
    ),
    # `compile: true` (regional torch.compile of the decoder layers): same batches, losses equal to fp32 eager's.
    System(
        "lpeft-lora-packed-compile",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, compile: true",
        True,
        group="lora-packed",
        model_options=(("compile", True),),
        default=False,
    ),
    # bf16-mixed on a CPU: the same batches, but its losses differ from fp32's by bf16 rounding (its own group).
    System(
        "lpeft-lora-packed-bf16",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, trainer.precision: bf16-mixed",
        True,
        trainer_options=(("precision", "bf16-mixed"),),
        default=False,
    ),
    # Full checkpointing as it was before `selective`: with the input-grad hook, layer 0 computes an unused gradient.
    System(
        "lpeft-lora-packed-ckpt-true-input-grads",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, gradient_checkpointing: true with transformers' input-grad hook (before)",
        True,
        group="lora-packed",
        model_options=(("gradient_checkpointing", True),),
        model_class="benchmarks.harness.lpeft.InputGradCheckpointLM",
        default=False,
    ),
    # `lpeft fit` runs on tcmalloc where it is installed, else on tbbmalloc (lightning_peft.allocator); these run on
    # tbbmalloc, and on glibc's malloc: its defaults (a heap that keeps freed activations), and returning them at
    # once (a fixed mmap threshold).
    System(
        "lpeft-lora-packed-tbbmalloc",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, oneTBB's malloc (LPEFT_MALLOC=tbbmalloc)",
        True,
        group="lora-packed",
        env=(("LPEFT_MALLOC", "tbbmalloc"),),
        default=False,
    ),
    System(
        "lpeft-lora-packed-glibc",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, glibc's malloc (LPEFT_MALLOC=glibc)",
        True,
        group="lora-packed",
        env=(("LPEFT_MALLOC", "glibc"),),
        default=False,
    ),
    System(
        "lpeft-lora-packed-mmap-threshold",
        "lpeft",
        "(e) lightning-peft LoRA, packing on, glibc's malloc with MALLOC_MMAP_THRESHOLD_=65536",
        True,
        group="lora-packed",
        env=(("LPEFT_MALLOC", "glibc"), ("MALLOC_MMAP_THRESHOLD_", "65536")),
        default=False,
    ),
    System("raw-qlora-packed", "raw", "(a) PyTorch + PEFT loop, QLoRA, packed", True, "4bit", group="qlora-packed"),
    System("lpeft-qlora-packed", "lpeft", "(e) lightning-peft QLoRA, packing on", True, "4bit", group="qlora-packed"),
)
BY_NAME = {system.name: system for system in SYSTEMS}


def floor_of(system: System) -> str:
    """The raw loop with the same batching and quantization: the overhead floor this system is measured against."""
    if system.quantization == "4bit":
        return "raw-qlora-packed"
    return "raw-lora-packed" if system.packing else "raw-lora-padded"
