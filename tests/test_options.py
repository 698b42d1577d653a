"""Each closed list of choices is written once, in lightning_peft/options.py, and used from there."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

import lightning_peft
from lightning_peft import options

PACKAGE = Path(lightning_peft.__file__).parent
# merging.py is being split into merging/ by another change; its MergeDtype / MERGE_DTYPES become
# options.DtypeName / DTYPES there. Remove this exception once that lands.
LISTS = {
    name: typing.get_args(value) for name, value in vars(options).items() if typing.get_origin(value) is typing.Literal
}


def test_every_tuple_is_its_literal():
    assert typing.get_args(options.Quantization) == options.QUANTIZATIONS
    assert typing.get_args(options.DataFormat)[1:] == options.FORMATS
    assert {"Quantization", "DtypeName", "Optimizer", "Scheduler", "AttnImplementation", "DataFormat"} <= set(LISTS)


@pytest.mark.parametrize("name", sorted(LISTS))
def test_no_module_spells_a_list_out_again(name):
    values = [v for v in LISTS[name] if v != "auto"]
    spelled = r"\s*,\s*".join(re.escape(repr(v)).replace("'", "[\"']") for v in values)
    copies = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "options.py" and re.search(spelled, path.read_text(encoding="utf-8"))
    ]
    assert copies == [], f"{name} {values} is spelled out again in {copies}: import it from lightning_peft.options"
