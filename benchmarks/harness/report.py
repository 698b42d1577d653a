"""Results as JSON (`latest.json`, one entry per system) and as a markdown table with ratios and the targets."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness.systems import BY_NAME, floor_of

# (column title, baseline system) for the ratio columns; ratios are of active tokens/s.
BASELINES = (("x classic (b)", "hf-classic"), ("x Trainer well (c)", "hf-dynamic"), ("x TRL (d)", "trl-packed"))
OURS = "lpeft-lora-packed"  # lightning-peft as a user runs it on variable-length data: packing on


def write(results: dict[str, Any], out: Path, mode: str) -> list[Path]:
    """`<out>/latest.json` + `latest.md`, and the same as `<mode>.json` + `<mode>.md`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1) + "\n"
    table = markdown(results) + "\n"
    paths = []
    for name in ("latest", mode):
        paths += [_write(out / f"{name}.json", text), _write(out / f"{name}.md", table)]
    return paths


def _write(path: Path, text: str) -> Path:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # a temporary file is private; results are for everyone
    os.replace(handle.name, path)
    return path


def ratio(results: dict[str, Any], system: str, baseline: str, key: str = "active_tokens_per_s") -> float | None:
    """`system`'s `key` over `baseline`'s, or None when either did not run."""
    entries = {e["system"]: e for e in results["systems"] if "error" not in e}
    if system not in entries or baseline not in entries or not entries[baseline].get(key):
        return None
    return entries[system][key] / entries[baseline][key]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured)."""
    rows = []
    ran = {e["system"] for e in results["systems"]}
    optional = ("lpeft-lora-packed-full-logits", "lpeft-lora-packed-raw-loss")
    for system in ("lpeft-lora-padded", "lpeft-lora-packed", *optional, "lpeft-qlora-packed"):
        if system not in ran and not BY_NAME[system].default:
            continue
        floor = floor_of(BY_NAME[system])
        rows.append(_target(f"{system} ≥ 0.97x {floor} (identical batches)", ratio(results, system, floor), 0.97))
    rows.append(_target(f"{OURS} ≥ 2x hf-classic (active tok/s)", ratio(results, OURS, "hf-classic"), 2.0))
    rows.append(_target(f"{OURS} ≥ 1.0x hf-dynamic", ratio(results, OURS, "hf-dynamic"), 1.0))
    rows.append(_target(f"{OURS} ≥ 1.0x trl-packed", ratio(results, OURS, "trl-packed"), 1.0))
    mfu = next((e.get("mfu") for e in results["systems"] if e["system"] == OURS), None)
    applies = results["settings"]["model"] == "smollm2-135m-instruct"
    label = f"{OURS} MFU ≥ 45% of the measured peak" + ("" if applies else " (set for SmolLM2; informative here)")
    rows.append(_target(label, mfu, 0.45, percent=True))
    return rows


def _target(name: str, value: float | None, goal: float, percent: bool = False) -> dict[str, Any]:
    return {
        "target": name,
        "value": value,
        "goal": goal,
        "met": None if value is None else value >= goal,
        "pct": percent,
    }


def markdown(results: dict[str, Any]) -> str:
    """The table, the identical-batch loss checks, the targets and the machine, as markdown."""
    lines = [_title(results), ""]
    lines += _system_table(results)
    lines += ["", "Identical batches, per-step losses (the comparison is void unless they agree):", ""]
    for check in results["loss_checks"]:
        verdict = "agree" if check["agree"] else "DISAGREE"
        lines.append(
            f"- {check['system']} vs {check['reference']}: max |Δloss| {check['max_abs_loss_diff']:.2e} over "
            f"{check['steps'][1]} steps (tolerance {check['tolerance']:.0e}): {verdict}"
        )
    lines += ["", "Targets:", ""]
    for row in targets(results):
        value = (
            "n/a" if row["value"] is None else f"{100 * row['value']:.1f}%" if row["pct"] else f"{row['value']:.2f}x"
        )
        state = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        lines.append(f"- {row['target']}: {value} — {state}")
    lines += ["", *_context(results)]
    return "\n".join(lines)


def _title(results: dict[str, Any]) -> str:
    settings = results["settings"]
    head = (
        f"### {settings['model']}, {settings['device']} {settings['precision']}, mode {results['mode']}"
        f"{' — VOID: losses of identical batches disagree' if results['void'] else ''}"
    )
    return head


def _system_table(results: dict[str, Any]) -> list[str]:
    gpu = any("peak_gpu_mb" in e for e in results["systems"])
    columns = ["system", "active tok/s", "processed tok/s", "MFU", "peak RSS MB", "first step s", "final loss"]
    if gpu:
        columns.insert(5, "peak GPU MB")
    columns += ["x raw (same batches)"] + [title for title, _ in BASELINES]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in results["systems"]:
        if "error" in entry:
            message = entry["error"].strip().splitlines()[-1][:100] if entry["error"].strip() else "failed"
            lines.append(f"| {entry['system']} | {message} |" + " |" * (len(columns) - 2))
            continue
        name = entry["system"]
        cells = [
            f"{name}",
            f"{entry['active_tokens_per_s']:.1f}",
            f"{entry['processed_tokens_per_s']:.1f}",
            f"{100 * entry['mfu']:.1f}%",
            f"{entry['peak_rss_mb']:.0f}",
            *([f"{entry.get('peak_gpu_mb', 0):.0f}"] if gpu else []),
            f"{entry['time_to_first_step_s']:.1f}",
            f"{entry['final_loss']:.4f}",
            _ratio_cell(ratio(results, name, floor_of(BY_NAME[name]))),
        ]
        cells += [_ratio_cell(ratio(results, name, baseline)) for _, baseline in BASELINES]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- `{e['system']}`: {e['label']}" for e in results["systems"]]
    return lines


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _context(results: dict[str, Any]) -> list[str]:
    s, d, f, m = results["settings"], results["data"], results["flops"], results["machine"]
    fill = d["real_fraction"]
    lines = [
        f"Data: {d['examples']} synthetic chat examples, {d['tokens']} tokens ({d['supervised_tokens']} supervised), "
        f"lengths p50 {d['length_p50']} / p90 {d['length_p90']} / max {d['length_max']} (max_length {s['max_length']}); "
        f"real tokens per processed token: max_length padding {fill['max_length_padding']:.2f}, dynamic padding "
        f"{fill['dynamic_padding']:.2f}, packing {fill['packing']:.2f}.",
        f"Training: batch {s['batch_size']}, one epoch, LoRA r={s['lora']['r']} all-linear, lr {s['learning_rate']}, "
        f"{s['warmup_steps']} warm-up step(s) left out of the throughput, median of {s['repeats']} run(s) per system, "
        f"each in a fresh process with {s['threads']} torch threads.",
        f"MFU: {f['per_token'] / 1e6:.1f} MFLOP per real token + {f['per_target'] / 1e6:.1f} MFLOP per supervised "
        f"token (LM head) + {f['per_attention_pair']} FLOP per causal attention pair, "
        f"against a measured {f['peak_dtype']} matmul peak of {f['peak_flops'] / 1e9:.1f} GFLOP/s ({f['peak_matmul']}, "
        f"best of {f['peak_measurements']} measurements in this run; lowest {f['peak_lowest_flops'] / 1e9:.1f}"
        f"{', so the machine was busy at times' if f['peak_lowest_flops'] < 0.8 * f['peak_flops'] else ''}).",
        f"Machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"Whole run: {results['elapsed_s']:.0f} s ({results['created']}).",
    ]
    startup = results.get("startup")
    if startup:
        lines.append(
            f"Start-up: `lpeft --help` {startup['lpeft_help_s']:.2f} s (median of {startup['runs']}), "
            f'`python -c "import torch"` {startup["import_torch_s"]:.2f} s; torch imported by '
            f"{', '.join(startup['imports_torch']) or 'none'} of the non-training commands checked."
        )
    return lines
