"""`lpeft inspect DIR --serving vllm`: would vLLM's LoRA loader take this adapter folder, and if not, why.

Each case is a real adapter saved by PEFT on the tiny model (or one broken on purpose), checked against what
vLLM's loader reads: `PEFTHelper` (adapter_config.json), `LoRAModel.from_local_checkpoint` (the weights file)
and `parse_fine_tuned_lora_name` (the tensor names).
"""

from __future__ import annotations

import json

import pytest
from hub_server import error_line, lpeft, make_adapter

from lightning_peft.hub.lint import lint_adapter_dir


def serving(folder):
    return lpeft("inspect", folder, "--serving", "vllm")


def reasons(result) -> list[str]:
    return [line[4:] for line in result.stdout.splitlines() if line.startswith("  - ")]


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return folder


def test_a_plain_lora_adapter_is_loadable(tiny_model_dir, tmp_path):
    result = serving(make_adapter(tmp_path / "lora", tiny_model_dir, r=8))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["vLLM: loadable"]


def test_rslora_and_a_rank_above_the_default_are_loadable_with_a_flag(tiny_model_dir, tmp_path):
    result = serving(make_adapter(tmp_path / "big", tiny_model_dir, r=32, use_rslora=True))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "vLLM: loadable"
    assert "  note: Rank 32 needs `--max-lora-rank 32` in vLLM (its default is 16)." in result.stdout


@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ({"use_dora": True}, "DoRA (`use_dora`=true) is not supported by vLLM."),
        ({"modules_to_save": ["lm_head"]}, "`modules_to_save`=['lm_head'] fully trains those modules"),
        ({"bias": "lora_only"}, "Trained biases (`bias`='lora_only'"),
        ({"lora_bias": True}, "`lora_bias`=True) are not supported by vLLM."),
        ({"r": 520}, "Rank 520 exceeds vLLM's largest `--max-lora-rank` (512)."),
    ],
    ids=["dora", "modules_to_save", "bias", "lora_bias", "rank"],
)
def test_what_vllm_refuses_is_named_one_reason_per_line(tiny_model_dir, tmp_path, lora, reason):
    result = serving(make_adapter(tmp_path / "adapter", tiny_model_dir, **lora))
    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines()[0] == "vLLM: not loadable"
    found = reasons(result)
    # One line for the cause: the tensors it leaves in the file (magnitudes, biases, full weights) are not
    # reported a second time.
    assert len(found) == 1 and reason in found[0], found


def test_an_ia3_adapter_is_not_loadable(tiny_model_dir, tmp_path):
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), IA3Config(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "ia3")
    result = serving(tmp_path / "ia3")
    assert result.exit_code == 2
    assert reasons(result) == ["vLLM serves LoRA adapters only, and this is IA3: merge it into the base to serve it."]


def test_missing_weights_or_config_fields_are_not_loadable(tiny_model_dir, tmp_path):
    folder = make_adapter(tmp_path / "no-weights", tiny_model_dir)
    (folder / "adapter_model.safetensors").unlink()
    result = serving(folder)
    assert result.exit_code == 2
    assert reasons(result) == [
        "No weights: vLLM loads adapter_model.safetensors, adapter_model.bin or adapter_model.pt, and none is here."
    ]

    folder = edit_config(make_adapter(tmp_path / "no-targets", tiny_model_dir), target_modules=None)
    assert reasons(serving(folder)) == ["adapter_config.json lacks target_modules, which vLLM requires."]

    (tmp_path / "empty").mkdir()
    assert reasons(serving(tmp_path / "empty")) == [
        "adapter_config.json is missing: vLLM reads the LoRA settings from it."
    ]


def test_pickle_weights_are_loadable_but_their_names_unchecked(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = make_adapter(tmp_path / "bin", tiny_model_dir)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    result = serving(folder)
    assert result.exit_code == 0
    assert "note: vLLM reads adapter_model.bin with torch.load(weights_only=True)" in result.stdout


def test_tensors_vllm_cannot_parse_are_found_even_when_the_config_looks_clean(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = make_adapter(tmp_path / "tampered", tiny_model_dir)
    tensors = load_file(folder / "adapter_model.safetensors")
    name = "base_model.model.lm_head.weight"
    save_file({**tensors, name: torch.zeros(3, 3)}, folder / "adapter_model.safetensors")
    result = serving(folder)
    assert result.exit_code == 2
    (reason,) = reasons(result)
    assert reason.startswith("adapter_model.safetensors holds 1 tensor(s) vLLM cannot parse") and name in reason


def test_a_rank_or_alpha_pattern_that_changes_a_modules_scale_is_not_loadable(tiny_model_dir, tmp_path):
    changed = make_adapter(tmp_path / "pattern", tiny_model_dir, r=4, lora_alpha=8, alpha_pattern={"q_proj": 16})
    (reason,) = reasons(serving(changed))
    assert "give q_proj another scale" in reason and "scale them by 2" in reason
    # The same scale under another rank and alpha (8/4 == 4/2) changes nothing for vLLM.
    same = make_adapter(
        tmp_path / "same", tiny_model_dir, r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 4}
    )
    assert serving(same).exit_code == 0


def test_embedding_targets_load_only_on_models_that_declare_them(tiny_model_dir, tmp_path):
    report = lint_adapter_dir(make_adapter(tmp_path / "emb", tiny_model_dir, target_modules=["q_proj", "embed_tokens"]))
    assert report.vllm_compatible
    assert any("LoRA on embed_tokens loads only for models whose vLLM class lists them" in n for n in report.notes)


def test_serving_flag_errors_and_the_default_inspect_output(tiny_model_dir, tmp_path):
    folder = make_adapter(tmp_path / "lora", tiny_model_dir)
    result = lpeft("inspect", folder, "--serving", "vllm", "--base", tiny_model_dir)
    assert result.exit_code == 2 and "`--serving` checks the adapter's own files" in error_line(result)
    result = serving(tmp_path / "absent")
    assert result.exit_code == 2 and "is not a folder" in error_line(result)
    result = lpeft("inspect", folder, "--serving", "tgi")
    assert result.exit_code == 2 and "'tgi' is not 'vllm'" in result.stderr
    plain = lpeft("inspect", folder)
    assert plain.exit_code == 0 and "serving: vLLM can load it as a LoRA adapter" in plain.stdout
    assert "vLLM: loadable" not in plain.stdout
