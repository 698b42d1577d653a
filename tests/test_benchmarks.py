"""The benchmark harness (`benchmarks/harness`, `benchmarks/gpu.sh`, `benchmarks/startup.py`).

The FLOP count is checked against torch's own FLOP counter, the token counts against hand-built batches, and a
tiny end-to-end run (`gpu.sh --dry-run`: two systems on identical batches, each in its own process) must write
the documented JSON with agreeing per-step losses. No timing is asserted: this machine's speed is not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerance import TINY_FORWARD, reordering_tolerance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.harness` is run from the repository root, not installed

from benchmarks.harness import data, flops, recorder, report, run  # noqa: E402

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
SYSTEM_KEYS = {"system", "active_tokens_per_s", "processed_tokens_per_s", "peak_rss_mb", "final_loss"}


def _counted_training_flops(attn_implementation: str, length: int) -> dict:
    """FLOPs torch counts for one LoRA forward + backward over one sequence, by operator."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation=attn_implementation))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(0, SHAPE["vocab_size"], (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_flops_per_token_match_torch_flop_counter():
    counted = _counted_training_flops("sdpa", length=16)
    ours = flops.training_flops(SHAPE, lora_rank=8)
    # With SDPA the counter sees the matmuls of the linear layers only: those must match exactly. The backward
    # starts from every position's logits here, so all 16 positions count as targets.
    assert counted == {"aten.mm": (ours["per_token"] + ours["per_target"]) * 16}


def test_attention_flops_match_torch_flop_counter():
    # Eager attention computes every (query, key) pair, masked ones included, as batched matmuls.
    counted = _counted_training_flops("eager", length=16)
    ours = flops.training_flops(SHAPE, lora_rank=8)
    assert counted["aten.bmm"] == ours["per_attention_pair"] * 16 * 16


def test_window_flops_count_steps_after_the_warmup():
    per_step = {"real": [100, 10, 20], "active": [50, 4, 5], "attention_pairs": [1000, 30, 40]}
    counts = {"per_token": 7, "per_target": 11, "per_attention_pair": 3}
    assert flops.window_flops(counts, per_step, warmup=1) == 30 * 7 + 9 * 11 + 70 * 3


def test_batch_counts_padded_rows():
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 4, 5, 6], [-100, 7, 8, -100, -100]]),
    }
    assert recorder.batch_counts(batch) == {"active": 5, "real": 8, "processed": 10, "attention_pairs": 15 + 6}


def test_batch_counts_packed_rows_leave_out_the_padding_segment():
    # Row 0 (lightning-peft): examples of 3 and 2 tokens, then 2 padding tokens (positions restart, labels -100).
    # Row 1 (TRL, padding-free): examples of 2 and 5 tokens, no padding.
    batch = {
        "input_ids": torch.zeros(2, 7, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]]),
        "labels": torch.tensor([[-100, 5, 5, -100, 5, -100, -100], [-100, 5, -100, 5, 5, 5, -100]]),
    }
    assert recorder.example_lengths(batch) == [3, 2, 2, 5]
    counts = recorder.batch_counts(batch)
    assert counts == {"active": 7, "real": 12, "processed": 14, "attention_pairs": 6 + 3 + 3 + 15}


def test_synthetic_data_is_deterministic_variable_length_and_fits(tiny_tokenizer, tmp_path):
    first = data.write_data(tmp_path / "a.jsonl", tiny_tokenizer, n=200, max_length=128, seed=3).read_text()
    second = data.write_data(tmp_path / "b.jsonl", tiny_tokenizer, n=200, max_length=128, seed=3).read_text()
    assert first == second
    lengths = []
    for line in first.splitlines():
        text = tiny_tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        lengths.append(len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]))
    lengths = np.array(lengths)
    assert lengths.max() <= 128
    # Long-tailed: the longest examples are several times the median, the padding a fixed length wastes.
    assert lengths.max() > 2 * np.median(lengths) and lengths.mean() < 0.7 * 128


def test_loss_checks_void_the_comparison_when_identical_batches_disagree():
    entries = [
        {"system": "raw-lora-padded", "group": "lora-padded", "losses": [2.0, 1.5]},
        {"system": "lpeft-lora-padded", "group": "lora-padded", "losses": [2.0, 1.5 + 1e-4]},
        {"system": "hf-dynamic", "group": "lora-padded", "losses": [2.0, 1.6]},
        {"system": "trl-packed", "group": None, "losses": [9.0]},
    ]
    checks = run.loss_checks(entries, {}, tolerance=1e-3)
    assert [(c["system"], c["agree"]) for c in checks] == [("lpeft-lora-padded", True), ("hf-dynamic", False)]
    assert checks[1]["max_abs_loss_diff"] == pytest.approx(0.1)


def test_startup_check_sees_imports_and_lpeft_help_imports_no_torch():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import startup

    assert "torch" in startup.imported_modules(["fit", "--help"])  # the check can see torch when it is imported
    modules = startup.imported_modules(["--help"])
    assert "click" in modules and "torch" not in modules


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_loss_memory_measures_each_loss_path_and_the_floor(tiny_model_dir):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import loss_memory

    common = dict(model=str(tiny_model_dir), quantization="none", gradient_checkpointing=False, batch=2, length=24)
    common.update(rank=4, steps=1, malloc="mmap")
    rows = [
        loss_memory.measure({**common, "chunk_size": chunk, "floor": floor})
        for chunk, floor in ((0, False), (8, False), (0, True))
    ]
    full, chunked, floor = rows
    assert chunked["chunked"] and not full["chunked"] and floor["floor"] and abs(floor["loss"]) < 1  # a hidden mean
    assert abs(chunked["loss"] - full["loss"]) < 1e-5 and full["loss"] > 1  # a real cross-entropy, both paths
    assert all(r["peak_rss_bytes"] >= r["rss_before_step_bytes"] > 0 for r in rows)
    lines = loss_memory.comparisons(rows)
    assert any("chunked peak RSS" in line and "the most any loss path could save" in line for line in lines)
    assert "no loss head (floor)" in loss_memory.table(rows)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_loss_memory_packs_rows_like_fit_and_compares_attention_paths(tiny_model_dir):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import loss_memory

    batch = loss_memory.packed_batch(rows=2, length=64, vocab=200)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape == (2, 64)
    assert (batch["position_ids"][:, 1:] == 0).any()  # several examples per row
    common = dict(model=str(tiny_model_dir), quantization="none", gradient_checkpointing=False, batch=2, length=64)
    common.update(rank=4, steps=1, malloc="mmap", rows="packed", chunk_size=0, floor=False)
    rows = [loss_memory.measure({**common, "packed_attention": on}) for on in (False, True)]
    assert [r["attention"] for r in rows] == ["sdpa", "lpeft_packed"]
    bound = reordering_tolerance(**TINY_FORWARD) * rows[0]["loss"]  # a mean over tokens of equal logits
    assert abs(rows[0]["loss"] - rows[1]["loss"]) <= bound and rows[0]["loss"] > 1
    assert any("per-document attention peak RSS" in line for line in loss_memory.comparisons(rows))
    assert "packed, per document" in loss_memory.table(rows)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_packed_attention_benchmark_sees_the_mask_only_on_the_sdpa_path():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import packed_attention

    sdpa, ours = packed_attention.measure(length=48, layers=1, steps=1, warmup=0)
    assert (sdpa["attention"], ours["attention"]) == ("sdpa", "lpeft_packed")
    assert sdpa["documents"] > sdpa["rows"] == 8  # several examples per packed row
    assert sdpa["square"] > 0 and ours["square"] == 0 and ours["saved"] < sdpa["saved"]


def test_gpu_script_dry_run_writes_results_with_agreeing_losses(tmp_path):
    """gpu.sh's Python path on the CPU with a tiny model: raw loop and lightning-peft on identical batches."""
    out = tmp_path / "results"
    env = {**os.environ, "BENCH_OUT": str(out), "LPEFT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "latest.json").read_text())
    assert json.loads((out / "gpu.json").read_text()) == results
    systems = {entry["system"]: entry for entry in results["systems"]}
    assert set(systems) == {"raw-lora-padded", "lpeft-lora-padded"}
    for entry in systems.values():
        assert set(entry) >= SYSTEM_KEYS, entry.get("error")
        assert entry["active_tokens_per_s"] > 0 and entry["processed_tokens_per_s"] >= entry["active_tokens_per_s"]
        assert entry["peak_rss_mb"] > 0 and entry["steps"] == len(entry["losses"]) > 1
    # Identical batches: the same number of steps and the same loss at every step.
    assert systems["raw-lora-padded"]["steps"] == systems["lpeft-lora-padded"]["steps"]
    assert [c["agree"] for c in results["loss_checks"]] == [True] and results["void"] is False
    assert "| lpeft-lora-padded |" in (out / "latest.md").read_text()


def test_gpu_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu.sh")]).returncode == 0


def test_report_ratios_and_targets():
    results = {
        "systems": [
            {"system": "raw-lora-packed", "active_tokens_per_s": 100.0},
            {"system": "lpeft-lora-packed", "active_tokens_per_s": 98.0, "mfu": 0.5},
            {"system": "hf-classic", "active_tokens_per_s": 40.0},
            {"system": "trl-packed", "error": "TRL is not installed"},
        ],
        "settings": {"model": "smollm2-135m-instruct"},
    }
    assert report.ratio(results, "lpeft-lora-packed", "hf-classic") == pytest.approx(2.45)
    assert report.ratio(results, "lpeft-lora-packed", "trl-packed") is None
    rows = {row["target"]: row["met"] for row in report.targets(results)}
    assert rows["lpeft-lora-packed ≥ 0.97x raw-lora-packed (identical batches)"] is True
    assert rows["lpeft-lora-packed ≥ 1.0x trl-packed"] is None
    assert rows["lpeft-lora-packed MFU ≥ 45% of the measured peak"] is True
