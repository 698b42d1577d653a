"""A training run for the kill tests: the tiny model, SFTDataModule and AdapterCheckpoint, losses logged per step.

The tests run it as a subprocess and SIGKILL it, then resume in-process with `train(..., ckpt_path="last")`:

    python tests/resume_worker.py MODEL_DIR WORK_DIR --max-steps 12 [--pause-at-step N] [--stall-save-at-step N]

`--pause-at-step N` sleeps before step N + 1 (checkpoint N is complete) and `--stall-save-at-step N` sleeps inside
the write of checkpoint N (after the adapter and state files, before the completion marker); both first create
WORK_DIR/paused, which the test waits for before it kills the process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as L
import torch

from lightning_peft import PeftCausalLM, SFTDataModule
from lightning_peft.callbacks import AdapterCheckpoint, checkpoint_folder

BATCH_SIZE = 3
EXAMPLES = 8  # 3 batches per epoch: 3, 3 and 2 examples


def write_data(folder: Path) -> tuple[Path, Path]:
    """Training and validation JSONL with answers of different lengths (so length grouping has work to do)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    rows = [
        {"prompt": f"Q{i}: name {i % 4 + 1} words. ", "completion": " ".join(words[: i % 4 + 1 + i])} for i in range(12)
    ]
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:EXAMPLES]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[EXAMPLES:]))
    return train, val


class LossLog(L.Callback):
    """Appends `step loss` for every optimizer step to a file, flushed at once (a killed run keeps its lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss'])!r}\n")


class PauseBeforeStep(L.Callback):
    """Sleeps when step `step` + 1 is about to run, after checkpoint `step` was written."""

    def __init__(self, step: int, flag: Path) -> None:
        self.step, self.flag = step, flag

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.flag.touch()
            time.sleep(600)


def stall_save_at(step: int, flag: Path) -> None:
    """Make the checkpoint of `step` hang after its files are written and before its marker (the last file)."""
    write_marker = checkpoint_folder._write_marker

    def slow_write_marker(folder, checkpoint):
        if checkpoint.get("global_step") == step:
            flag.touch()
            time.sleep(600)
        write_marker(folder, checkpoint)

    checkpoint_folder._write_marker = slow_write_marker


def train(
    model_dir: str | Path,
    work_dir: str | Path,
    max_steps: int,
    ckpt_path: str | None = None,
    pause_at_step: int | None = None,
    stall_save_at_step: int | None = None,
) -> tuple[PeftCausalLM, L.Trainer]:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the same reduction order in the subprocess and in the test process
    L.seed_everything(0)
    train_file, val_file = write_data(work_dir)
    data = SFTDataModule(
        str(train_file),
        val_file=str(val_file),
        tokenizer=str(model_dir),
        batch_size=BATCH_SIZE,
        group_by_length=True,
        max_length=128,
        cache=False,
    )
    module = PeftCausalLM(
        str(model_dir),
        adapter={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        learning_rate=1e-2,
        lr_scheduler="constant",
        warmup_steps=5,
        save_adapter_on_fit_end=False,
    )
    callbacks: list[L.Callback] = [
        LossLog(work_dir / "losses.txt"),
        AdapterCheckpoint(dirpath=work_dir / "checkpoints", filename="{step}", every_n_train_steps=2, save_top_k=-1),
    ]
    if pause_at_step is not None:
        callbacks.append(PauseBeforeStep(pause_at_step, work_dir / "paused"))
    if stall_save_at_step is not None:
        stall_save_at(stall_save_at_step, work_dir / "paused")
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work_dir,
        callbacks=callbacks,
        num_sanity_val_steps=1,
        limit_val_batches=1,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def read_losses(work_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of every run that wrote into `work_dir`, in order (a resumed run appends to the killed one's)."""
    words = (Path(work_dir) / "losses.txt").read_text().split()
    return [(int(step), float(loss)) for step, loss in zip(words[::2], words[1::2], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("work_dir")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--ckpt-path")
    parser.add_argument("--pause-at-step", type=int)
    parser.add_argument("--stall-save-at-step", type=int)
    args = parser.parse_args()
    train(
        args.model_dir,
        args.work_dir,
        args.max_steps,
        ckpt_path=args.ckpt_path,
        pause_at_step=args.pause_at_step,
        stall_save_at_step=args.stall_save_at_step,
    )


if __name__ == "__main__":
    main()
