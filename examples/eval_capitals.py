"""How many validation questions a model answers as valid JSON, and how many with the right capital.

python examples/eval_capitals.py                       # the base model alone
python examples/eval_capitals.py runs/quickstart/lightning_logs/version_0/adapter

The same scores through lm-evaluation-harness, base and adapter side by side (tasks/capitals.yaml):
lpeft eval --model smollm2-135m-instruct --adapter ADAPTER_DIR --with-base --chat --tasks examples/tasks/capitals.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning_peft import PeftCausalLM

sys.path.insert(0, str(Path(__file__).parent / "tasks"))
from capitals import judge  # the harness task's scoring, beside its YAML

VAL = Path(__file__).parent / "data" / "capitals_val.jsonl"


def score(model: PeftCausalLM) -> tuple[int, int, int]:
    rows = [json.loads(line) for line in VAL.read_text().splitlines()]
    valid_json = right_capital = 0
    for row in rows:
        question, answer = (m["content"] for m in row["messages"])
        valid, right = judge(model.generate(question, max_new_tokens=48), json.loads(answer)["capital"])
        valid_json += valid
        right_capital += right
    return valid_json, right_capital, len(rows)


if __name__ == "__main__":
    adapter = {"adapter": None, "adapter_path": sys.argv[1]} if len(sys.argv) > 1 else {}
    model = PeftCausalLM("smollm2-135m-instruct", **adapter)
    valid_json, right_capital, total = score(model)
    print(f"valid JSON: {valid_json}/{total}   right capital: {right_capital}/{total}")
