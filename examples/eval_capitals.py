"""How many validation questions a model answers as valid JSON, and how many with the right capital.

python examples/eval_capitals.py                       # the base model alone
python examples/eval_capitals.py runs/quickstart/lightning_logs/version_0/adapter
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning_peft import PeftCausalLM

VAL = Path(__file__).parent / "data" / "capitals_val.jsonl"


def score(model: PeftCausalLM) -> tuple[int, int, int]:
    rows = [json.loads(line) for line in VAL.read_text().splitlines()]
    valid_json = right_capital = 0
    for row in rows:
        question, answer = (m["content"] for m in row["messages"])
        expected = json.loads(answer)["capital"]
        reply = model.generate(question, max_new_tokens=24)
        try:
            valid_json += 1
            right_capital += json.loads(reply).get("capital") == expected
        except (json.JSONDecodeError, AttributeError):
            valid_json -= 1
            right_capital += expected in reply
    return valid_json, right_capital, len(rows)


if __name__ == "__main__":
    adapter = {"adapter": None, "adapter_path": sys.argv[1]} if len(sys.argv) > 1 else {}
    model = PeftCausalLM("smollm2-135m-instruct", **adapter)
    valid_json, right_capital, total = score(model)
    print(f"valid JSON: {valid_json}/{total}   right capital: {right_capital}/{total}")
