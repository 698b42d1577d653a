"""The benchmark's data: synthetic variable-length instruction pairs, and the fixed batches every system sees.

The records are chat `messages` (one user turn, one assistant turn, loss on the assistant turn) whose lengths in
tokens follow long-tailed log-normal laws, like real instruction sets (most examples short, a few near the
limit), generated from a seed so every run trains on the same bytes. `build_plan` then tokenizes them once with
lightning-peft's own data pipeline and lays out the batches: the length-grouped padded batches and the packed
rows that `SFTDataModule` yields for epoch 0. Systems fed "identical batches" take exactly these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# Common English words: real text gives a BPE tokenizer realistic tokens per word.
_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their has been if more when will would who so no time people year way day "
    "man thing woman life child world school state family student group country problem hand part place case week "
    "company system program question work government number night point home water room mother area money story "
    "fact month lot right study book eye job word business issue side kind head house service friend father power "
    "hour game line end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change morning reason "
    "research girl guy moment air teacher force education explain describe write list compare summarize give "
    "simple short clear answer because however therefore example first second finally important different small "
    "large early late young old good new great high long little own other same able free full sure whole"
)
WORDS = tuple(_TEXT.split())


def generate_records(n: int, max_length: int, tokens_per_word: float, overhead: int, seed: int = 0) -> list[dict]:
    """`n` chat records whose token counts (template `overhead` included) stay within `max_length`.

    Prompt and answer lengths are log-normal with medians of 10% and 22% of `max_length` (answers with the heavier
    tail); a pair that would not fit is scaled down to fit, so the longest examples sit at the limit.
    """
    rng = np.random.default_rng(seed)
    budget = max(max_length - overhead - 2, 8)
    prompt = rng.lognormal(np.log(0.10 * max_length), 0.7, n)
    answer = rng.lognormal(np.log(0.22 * max_length), 0.9, n)
    scale = np.minimum(1.0, budget / (prompt + answer))
    records = []
    for p, a in zip(prompt * scale, answer * scale, strict=True):
        records.append(
            {
                "messages": [
                    {"role": "user", "content": _sentence(rng, p / tokens_per_word)},
                    {"role": "assistant", "content": _sentence(rng, a / tokens_per_word)},
                ]
            }
        )
    return records


def _sentence(rng: np.random.Generator, words: float) -> str:
    count = max(1, int(words))
    text = " ".join(rng.choice(WORDS, count))
    return text[0].upper() + text[1:] + "."


def tokens_per_word(tokenizer: Any) -> float:
    """How many tokens one word of `WORDS` text costs with this tokenizer (about 1.2 for BPE, 5.5 for bytes)."""
    text = " ".join(WORDS * 4)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / (4 * len(WORDS))


def template_overhead(tokenizer: Any) -> int:
    """Tokens the chat template adds around a one-word exchange (SmolLM2 adds a default system prompt)."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def write_data(path: Path, tokenizer: Any, n: int, max_length: int, seed: int = 0) -> Path:
    """Write `n` records as JSON Lines to `path`, sized for this tokenizer."""
    records = generate_records(n, max_length, tokens_per_word(tokenizer), template_overhead(tokenizer), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def build_plan(train_file: Path, tokenizer: Any, max_length: int, batch_size: int, seed: int) -> dict[str, Any]:
    """The batches of epoch 0 as `SFTDataModule` yields them, padded and packed, and the examples in file order.

    Returns:
        {"padded": [batch, ...], "packed": [batch, ...], "examples": [(input_ids, labels), ...]} with batches as
        dicts of int64 tensors and examples as int64 numpy arrays.
    """
    from lightning_peft.data import SFTDataModule

    plan: dict[str, Any] = {}
    for name, packing in (("padded", False), ("packed", True)):
        data = SFTDataModule(
            str(train_file),
            format="messages",
            max_length=max_length,
            batch_size=batch_size,
            packing=packing,
            seed=seed,
            tokenizer=tokenizer,
        )
        data.setup("fit")
        plan[name] = list(data.train_dataloader())
        if not packing:
            dataset = data.train_dataset
            examples = [dataset.data.example(i) for i in range(len(dataset.data))]
            plan["examples"] = [(x.astype(np.int64), y.astype(np.int64)) for x, y in examples]
    return plan


def plan_examples_in_order(batches: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The unpadded examples of padded batches, batch after batch: what a sequential sampler must yield."""
    examples = []
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(mask.sum())
            examples.append((ids[:n].numpy(), labels[:n].numpy()))
    return examples


def describe(plan: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Length statistics of the examples and how much of each batching is real tokens."""
    lengths = np.array([len(x) for x, _ in plan["examples"]])
    supervised = int(sum(int((y[1:] != -100).sum()) for _, y in plan["examples"]))
    real = int(lengths.sum())

    def fill(batches: list[dict]) -> float:
        return real / sum(b["input_ids"].numel() for b in batches)

    return {
        "examples": len(lengths),
        "tokens": real,
        "supervised_tokens": supervised,
        "length_p50": int(np.percentile(lengths, 50)),
        "length_p90": int(np.percentile(lengths, 90)),
        "length_max": int(lengths.max()),
        "max_length": max_length,
        "real_fraction": {
            "max_length_padding": round(real / (len(lengths) * max_length), 4),
            "dynamic_padding": round(fill(plan["padded"]), 4),
            "packing": round(fill(plan["packed"]), 4),
        },
    }
