"""Every decoder family users fine-tune: fit (LoRA and 4-bit QLoRA), merge, serve and publish a tiny model of each.

The models are random and tiny (`tiny_families.py`); what is checked are properties that hold for any weights:
all-linear adapts every linear layer but the LM head, merged logits equal the unmerged adapter's within float32
rounding, the served adapter computes what was trained, a published package verifies against its base.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer, run_folder, token_batches
from lightning.pytorch import seed_everything
from tiny_families import FAMILIES, VOCAB, build_family_model, save_family_model

from lightning_peft import PeftCausalLM
from lightning_peft.adapters import build_peft_config, inject_adapter, load_adapter
from lightning_peft.architectures import supported_attn_implementations
from lightning_peft.errors import ConfigError
from lightning_peft.merging import merge_adapter
from lightning_peft.models import linear_module_names, load_base_model

REPO = Path(__file__).resolve().parents[1]
MOE = ("mixtral", "qwen3_moe")
EPS32 = torch.finfo(torch.float32).eps
FOUR_BIT_FP32 = {"bnb_4bit_compute_dtype": torch.float32}  # what training on a CPU computes with


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """`family_dir(name)`: a folder with a tiny model of that family and the byte tokenizer (built once)."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_family_model(family, root / family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def trained(family_dir, tmp_path_factory):
    """`trained(family, quantization)`: the adapter folder of a 2-step fit (made once per pair)."""
    root, made = tmp_path_factory.mktemp("fits"), {}

    def get(family: str, quantization: str) -> Path:
        if (family, quantization) not in made:
            made[family, quantization] = fit(family_dir(family), quantization, root / f"{family}-{quantization}")
        return made[family, quantization]

    return get


def fit(base: Path, quantization: str, run: Path) -> Path:
    """Two optimizer steps of LoRA on `base`; B starts random so the adapter changes the logits from step 0."""
    seed_everything(0)
    module = PeftCausalLM(
        str(base),
        quantization=quantization,
        adapter={"r": 4, "init_lora_weights": False},
        learning_rate=1e-2,
        adapter_dir=str(run / "adapter"),
    )
    trainer = quiet_trainer(run, max_steps=2)
    trainer.fit(module, train_dataloaders=token_batches(n_batches=2, vocab=VOCAB))
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    return run / "adapter"


def probe_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits.float()


def unmerged(base: Path, adapter: Path, quantization: str) -> torch.nn.Module:
    """The model as trained: the base (4-bit with float32 compute for QLoRA) with the adapter on top."""
    options = FOUR_BIT_FP32 if quantization == "4bit" else None
    model = load_base_model(str(base), quantization=quantization, quantization_options=options)
    return load_adapter(model, adapter)


def rounding_bound(model: torch.nn.Module, logits: torch.Tensor) -> float:
    """How far two float32 evaluations of the same function may differ, x·(W + BA) against x·W + (x·B)·A.

    A dot product of length k rounds by at most k·eps relative to the sum of its terms' magnitudes. k is at
    most the largest matrix side below the vocabulary; about four matmuls per layer lie in series on the path
    to the logits (attention in and out, MLP in and out), and the logits' own scale sets the absolute size.
    """
    sides = [d for p in model.parameters() if p.dim() >= 2 for d in p.shape[-2:] if d != VOCAB]
    layers = model.config.num_hidden_layers
    return EPS32 * max(sides) * 4 * layers * max(1.0, float(logits.abs().max()))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---- what all-linear adapts, and the attention backend chosen -------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_adapts_every_linear_layer_but_the_lm_head(family):
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    model = build_family_model(family)
    linear = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    head = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
    fused = {n.rpartition(".")[0] for n, p in model.named_parameters() if p.dim() == 3}
    peft_model = inject_adapter(model, build_peft_config({"r": 2}))
    adapted = {
        n.removeprefix("base_model.model.").split(".base_layer")[0]
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert head and not head & adapted
    assert adapted >= linear - head
    assert adapted >= fused  # MoE experts: fused 3-D parameters, adapted through PEFT's target_parameters
    assert bool(fused) == (family in MOE)
    assert not any(isinstance(m, torch.nn.Embedding) for n, m in model.named_modules() if n in adapted)


def test_linear_module_names_include_gpt2_conv1d():
    assert {"c_attn", "c_fc", "c_proj", "lm_head"} <= set(linear_module_names(build_family_model("gpt2")))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_attention_is_the_best_the_model_implements(family, family_dir):
    model = load_base_model(str(family_dir(family)))
    expected = "sdpa" if "sdpa" in supported_attn_implementations(type(model)) else "eager"
    assert model.config._attn_implementation == expected
    assert expected == ("eager" if family in ("gpt_neo", "bloom", "gemma2") else "sdpa")


@pytest.mark.parametrize(
    ("family", "model_class", "supported"),
    [
        ("gpt_neo", "GPTNeoForCausalLM", "eager, flash_attention_2, flash_attention_3"),
        ("bloom", "BloomForCausalLM", "eager"),
    ],
)
def test_a_backend_the_model_lacks_is_one_line_before_loading(family, model_class, supported, family_dir):
    pattern = rf"^`model.attn_implementation`='sdpa' is not implemented by {model_class}, which supports {supported};"
    with pytest.raises(ConfigError, match=pattern) as error:
        load_base_model(str(family_dir(family)), attn_implementation="sdpa")
    assert "\n" not in str(error.value)
    module = PeftCausalLM(str(family_dir(family)), attn_implementation="sdpa")
    with pytest.raises(ConfigError, match=pattern):
        module.configure_model()


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (
            "flash_attention_2",
            r"^`model.attn_implementation`='flash_attention_2' could not be used \(FlashAttention2 .*",
        ),
        ("paged", r"^`model.attn_implementation`='paged' is not a known attention backend; use one of auto, eager,"),
    ],
)
def test_a_backend_that_cannot_load_is_one_line(backend, message, family_dir):
    if backend.startswith("flash") and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here, so the backend loads")
    with pytest.raises(ConfigError, match=message) as error:
        load_base_model(str(family_dir("llama")), attn_implementation=backend)
    assert "\n" not in str(error.value)


def test_eager_attention_keeps_packed_examples_apart_but_bloom_alibi_does_not(family_dir):
    gpt_neo = PeftCausalLM(str(family_dir("gpt_neo")))
    gpt_neo.configure_model()
    gpt_neo.check_packing_isolation()  # eager attention honours position_ids
    bloom = PeftCausalLM(str(family_dir("bloom")))
    bloom.configure_model()
    with pytest.raises(
        ConfigError, match=r"^`data.packing: true` is not safe with BloomForCausalLM .*'eager'.*false`\.$"
    ):
        bloom.check_packing_isolation()


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize(("setting", "value"), [("lora_dropout", 0.1), ("use_dora", True)])
def test_settings_fused_experts_refuse_are_one_line(family, setting, value):
    with pytest.raises(
        ConfigError, match=rf"^`adapter.{setting}`={value} cannot be used on .*fused mixture-of-experts"
    ):
        inject_adapter(build_family_model(family), build_peft_config({setting: value}))
    # Without the experts the same setting is fine.
    inject_adapter(build_family_model(family), build_peft_config({setting: value, "target_modules": ["q_proj"]}))


def test_qlora_on_moe_says_the_experts_stay_unquantized(family_dir, caplog):
    with caplog.at_level("WARNING", logger="lightning_peft.architectures"):
        load_base_model(str(family_dir("mixtral")), quantization="4bit")
    assert "fused expert weights" in caplog.text and "stay in torch.float32" in caplog.text


# ---- the whole path: fit, merge, serve, publish ---------------------------------------------------------------


# QLoRA on the Llama-shaped families runs the same bitsandbytes layers as on Llama: slow rows (the matrix
# takes over 2 minutes on 2 cores otherwise).
LLAMA_SHAPED = ("mistral", "qwen2", "qwen3", "gemma3", "phi3", "olmo2")
PATH_ROWS = [
    pytest.param(family, q, marks=[pytest.mark.slow] if q == "4bit" and family in LLAMA_SHAPED else [])
    for family in FAMILIES
    for q in ("none", "4bit")
]


@pytest.mark.parametrize(("family", "quantization"), PATH_ROWS)
def test_fit_merge_and_serve(family, quantization, family_dir, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_peft.serving import AdapterServer

    base, adapter, ids = family_dir(family), trained(family, quantization), probe_ids()
    as_trained = unmerged(base, adapter, quantization)
    expected = logits_of(as_trained, ids)
    bound = rounding_bound(as_trained, expected)
    with as_trained.disable_adapter():
        base_logits = logits_of(as_trained, ids)
    assert max_diff(base_logits, expected) > 100 * bound  # the adapter matters

    report = merge_adapter(adapter, tmp_path / "merged", quantization=quantization, compare_modes=False)
    assert report.passed and report.max_abs_logit_diff <= report.tolerance
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert max_diff(logits_of(merged, ids), expected) <= bound

    options = FOUR_BIT_FP32 if quantization == "4bit" else None
    server = AdapterServer(str(base), quantization=quantization, quantization_options=options)
    server.load("tuned", adapter)
    assert max_diff(server.forward({"input_ids": ids}, adapters="tuned").logits.float(), expected) <= bound
    mixed = server.forward({"input_ids": ids}, adapters=["tuned", "base"]).logits.float()  # one row each
    assert max_diff(mixed[0], expected[0]) <= bound and max_diff(mixed[1], base_logits[1]) <= bound
    (answer,) = server.generate(["Hello"], adapters="tuned", max_new_tokens=3)
    assert isinstance(answer, str)


def test_serving_checks_read_conv1d_and_expert_shapes(trained):
    from transformers import AutoModelForCausalLM

    from lightning_peft.serving.checks import check_adapter, module_shapes

    gpt2, mixtral = trained("gpt2", "none"), trained("mixtral", "none")
    check_adapter(gpt2, module_shapes(build_family_model("gpt2")))
    check_adapter(mixtral, module_shapes(build_family_model("mixtral")))
    wider = FAMILIES["gpt2"]()
    wider.n_embd = 64
    with pytest.raises(ConfigError, match=r"transformer.h.0.attn.c_attn has 64 input features"):
        check_adapter(gpt2, module_shapes(AutoModelForCausalLM.from_config(wider)))
    # Same module paths and attention shapes, narrower experts: only the expert tensors do not fit.
    with pytest.raises(ConfigError, match=r"mlp.experts.* fits none of the parameters of model.layers.0.mlp.experts"):
        check_adapter(mixtral, module_shapes(build_family_model("qwen3_moe")))


@pytest.mark.parametrize("family", FAMILIES)
def test_publish_verifies_the_package_on_its_base(family, family_dir, trained, tmp_path):
    from lightning_peft.hub import publish, pull

    repo = f"acme/{family.replace('_', '-')}"
    publish(trained(family, "none"), repo, registry=str(tmp_path / "registry"), base=str(family_dir(family)))
    pulled = pull(repo, tmp_path / "pulled", registry=str(tmp_path / "registry"), base=str(family_dir(family)))
    assert pulled.version == "1.0.0" and pulled.base_matches
    assert (pulled.path / "adapter_model.safetensors").is_file()


# ---- the real command line, for the families with unusual layers --------------------------------------------


def lpeft(*args):
    return subprocess.run(
        [sys.executable, "-m", "lightning_peft", *map(str, args)], capture_output=True, text=True, cwd=REPO
    )


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_cli_merges_and_generates(family, family_dir, trained, tmp_path):
    adapter = trained(family, "none")
    merged = lpeft("merge", adapter, "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["passed"]
    answer = lpeft(
        "generate", "--model", family_dir(family), "--adapter", f"tuned={adapter}", "--with-base",
        "--prompt", "Hi", "--max-new-tokens", 3,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    labels = {line.split()[0] for line in answer.stdout.splitlines() if line.startswith("[")}
    assert labels == {"[tuned]", "[base]"}, answer.stdout


def test_cli_fits_gpt_neo_with_its_eager_attention(family_dir, tmp_path):
    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"model_name_or_path": str(family_dir("gpt_neo")), "adapter": {"r": 2}},
        "data": {"train_file": str(tmp_path / "train.jsonl"), "max_length": 32, "batch_size": 2, "packing": True},
        "trainer": {"max_steps": 1, "default_root_dir": str(tmp_path / "runs"), "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    result = lpeft("fit", "--config", tmp_path / "run.yaml")
    assert result.returncode == 0, result.stderr
    assert (run_folder(tmp_path / "runs") / "adapter" / "adapter_model.safetensors").is_file()
