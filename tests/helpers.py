"""Small helpers shared by the tests: batches of random tokens, a quiet Trainer, an SGD-trained module."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

from lightning_peft import PeftCausalLM


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


def write_run_config(tmp_path, tiny_model_dir, *, model=None, data=None, trainer=None, examples: int = 6):
    """`tmp_path/run.yaml` for `lpeft fit`: 2 steps of LoRA r=2 on the tiny model, no logger, no checkpoints, runs
    in `tmp_path/runs`; `examples` prompt/completion rows in `tmp_path/train.jsonl`, a third of them (rounded up)
    for validation. `model`, `data` and `trainer` override or add keys of their sections; a key set to None is
    left out (the setting's own default then applies)."""
    import json

    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(examples)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"model_name_or_path": str(tiny_model_dir), "adapter": {"r": 2}, **(model or {})},
        "data": {"train_file": str(train), "val_fraction": 0.34, "max_length": 64, "batch_size": 2, **(data or {})},
        "trainer": {
            "max_steps": 2,
            "default_root_dir": str(tmp_path / "runs"),
            "enable_progress_bar": False,
            "logger": False,
            "enable_checkpointing": False,
            **(trainer or {}),
        },
    }
    config = {section: {k: v for k, v in keys.items() if v is not None} for section, keys in config.items()}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def run_folder(root, version: int = -1):
    """A run's folder under `default_root_dir` without a local logger (`lightning_logs/version_N`), newest first."""
    from pathlib import Path

    folders = sorted((Path(root) / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return folders[version]


def adapter_tensors(module) -> dict[str, torch.Tensor]:
    """Copies of the adapter's tensors, keyed as in the module's state_dict."""
    keys = module.adapter_state_keys()
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in keys}


class SGDPeftCausalLM(PeftCausalLM):
    """`PeftCausalLM` trained with SGD and momentum, for tests that compare two ways of training.

    Each step moves the adapter by a fixed linear combination of the gradients so far, so a difference in the
    gradients shows as it is, and the bounds of `tolerance.py` apply. AdamW divides by the gradient's running RMS:
    a gradient near its eps (1e-8) turns a rounding difference of 1e-10 into a step change of ~1% of the learning
    rate, and a gradient scaled by 2 (a wrong average) into the very same step. The momentum is optimizer state,
    which resuming must restore.
    """

    MOMENTUM = 0.5

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.hparams.learning_rate, momentum=self.MOMENTUM)


def run_card_snippet(card_text: str, replacements: dict[str, str]) -> dict:
    """Run a model card's first Python block as written, after `replacements` (Hub names → local folders, e.g.
    '"acme/x", revision="v1.0.0"' → a package path); returns the names it defined (`model`, `tokenizer` ...)."""
    import re

    snippet = re.search(r"```python\n(.*?)```", card_text, re.S).group(1)
    for old, new in replacements.items():
        assert old in snippet, (old, snippet)
        snippet = snippet.replace(old, new)
    scope: dict = {}
    exec(snippet, scope)  # the card's own text, written by the test that calls this
    return scope
