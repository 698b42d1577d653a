"""Scoring for the quickstart's capital-city questions, shared by the harness task and `eval_capitals.py`.

A reply scores `valid_json` when it parses as a JSON object, and `right_capital` when its "capital" is the
expected city (a reply that is not JSON still counts when it names the city: "The capital of Peru is Lima.").
"""

from __future__ import annotations

import json


def judge(reply: str, expected: str) -> tuple[bool, bool]:
    """(valid JSON, right capital) for one reply."""
    try:
        answer = json.loads(reply)
    except json.JSONDecodeError:
        return False, expected in reply
    if not isinstance(answer, dict):
        return False, expected in reply
    return True, answer.get("capital") == expected


def question(doc: dict) -> str:
    """The user turn of a validation row (`messages` format)."""
    return doc["messages"][0]["content"]


def expected(doc: dict) -> str:
    """The assistant turn of the row: the JSON answer the adapter is taught to give."""
    return doc["messages"][1]["content"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The harness's per-document metrics for a generate_until reply."""
    valid_json, right_capital = judge(results[0], json.loads(expected(doc))["capital"])
    return {"valid_json": float(valid_json), "right_capital": float(right_capital)}
