"""Small helpers shared by the tests: batches of random tokens and a quiet Trainer."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader


def token_batches(n_batches: int = 4, batch_size: int = 4, length: int = 12, seed: int = 0, vocab: int = 200):
    """A DataLoader yielding ready-made batches (every token supervised), in a fixed order."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_batches * batch_size, length), generator=generator)
    batches = [
        {"input_ids": chunk, "labels": chunk.clone(), "attention_mask": torch.ones_like(chunk)}
        for chunk in ids.split(batch_size)
    ]
    return DataLoader(batches, batch_size=None)


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def adapter_tensors(module) -> dict[str, torch.Tensor]:
    """Copies of the adapter's tensors, keyed as in the module's state_dict."""
    keys = module.adapter_state_keys()
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in keys}
