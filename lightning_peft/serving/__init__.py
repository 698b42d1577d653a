"""Many LoRA adapters on one base model: load, check, switch, combine, and run mixed batches.

    from lightning_peft.serving import AdapterServer

    server = AdapterServer("smollm2-135m-instruct", quantization="4bit")
    server.load("capitals", "runs/quickstart/lightning_logs/version_0/adapter")
    server.load("poems", "acme/poems@^1")                 # a registry reference: pulled, verified, cached
    server.generate(["Capital of Peru?", "Capital of Peru?"], adapters=["capitals", None], chat=True)

Modules: `server` (`AdapterServer`), `batched` (mixed batches of plain LoRA adapters in a few ops per layer),
`checks` (an adapter against a base, before loading), `references` (adapter sources; registry references
pulled into a cache), `rows` (each row's adapter, prompts to a padded batch, generation settings), `templates`.
Importing this package does not import torch.
"""

from __future__ import annotations

from lightning_peft.serving.batched import ConcatenatedLora
from lightning_peft.serving.checks import check_adapter
from lightning_peft.serving.references import fetch_reference
from lightning_peft.serving.server import BASE, COMBINATIONS, AdapterServer

__all__ = ["BASE", "COMBINATIONS", "AdapterServer", "ConcatenatedLora", "check_adapter", "fetch_reference"]
