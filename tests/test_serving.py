"""AdapterServer: many LoRA adapters on one base — mixed batches, switching, combining, and the checks before loading.

Every expectation is computed independently of the server: a fresh `PeftModel` per adapter, the plain base, or
weights merged by hand from the adapter's safetensors file.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hub_server import make_adapter, pickle_only_adapter
from safetensors.torch import load_file, save_file
from tiny import save_tiny_model
from tolerance import TINY_FORWARD, assert_close_reordered

from lightning_peft.errors import ConfigError
from lightning_peft.serving import AdapterServer

PROMPTS = ["hello there", "a", "The quick brown fox jumps", "xyz"]


@pytest.fixture(scope="module")
def lora(tiny_model_dir, tmp_path_factory):
    """Three rank-2 adapters and one rank-4 adapter on the tiny base, all with random non-zero B."""
    root = tmp_path_factory.mktemp("adapters")
    folders = {f"a{i}": make_adapter(root / f"a{i}", tiny_model_dir, seed=i + 1) for i in range(3)}
    folders["r4"] = make_adapter(root / "r4", tiny_model_dir, seed=9, r=4, lora_alpha=16)
    return folders


@pytest.fixture
def server(tiny_model_dir, lora):
    server = AdapterServer(str(tiny_model_dir))
    for name in ("a0", "a1", "a2"):
        server.load(name, lora[name])
    return server


def reference_logits(base_dir, adapter_dir, ids):
    """Logits of one row with a freshly loaded PeftModel (or the plain base when `adapter_dir` is None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[0]


def test_mixed_batch_equals_each_row_alone(server, tiny_model_dir, lora):
    rows = ["a0", None, "a2", "a1"]
    batch = server.encode(PROMPTS)
    assert (batch["attention_mask"] == 0).any(), "the rows must be left-padded for this test to mean something"
    mixed = server.forward(batch, adapters=rows).logits
    for i, (prompt, name) in enumerate(zip(PROMPTS, rows, strict=True)):
        ids = server.tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected = reference_logits(tiny_model_dir, lora[name] if name else None, ids)
        assert_close_reordered(mixed[i, -ids.shape[1] :], expected, **TINY_FORWARD, msg=str((i, name)))
    # Different adapters really do give different logits, so the equality above is not trivial.
    same_prompt = server.forward(server.encode(["hello"] * 4), adapters=["a0", "a1", "a2", "base"]).logits
    assert min((same_prompt[i] - same_prompt[j]).abs().max() for i in range(4) for j in range(i)) > 1e-2


def test_mixed_generation_equals_each_row_alone(server):
    rows = ["a2", "a0", "base", "a1"]
    mixed = server.generate_ids(PROMPTS, rows, max_new_tokens=12)
    for i, (prompt, name) in enumerate(zip(PROMPTS, rows, strict=True)):
        alone = server.generate_ids([prompt], name, max_new_tokens=12)[0]
        assert torch.equal(mixed[i, : len(alone)], alone), (i, name)
    texts = server.generate(PROMPTS, rows, max_new_tokens=12)
    assert texts == server.tokenizer.batch_decode(mixed, skip_special_tokens=True)
    assert len({tuple(server.generate_ids(["hello"], n, max_new_tokens=8)[0].tolist()) for n in rows}) == 4


def test_mixed_paths_concatenated_and_peft(server, tiny_model_dir, lora, tmp_path, monkeypatch):
    from peft.tuners.lora.layer import Linear

    def refuse(*args, **kwargs):
        raise AssertionError("PEFT's per-adapter loop ran")

    batch, rows = server.encode(PROMPTS), ["a0", "a1", "base", "a2"]
    with monkeypatch.context() as patch:  # plain LoRA adapters go through ConcatenatedLora
        patch.setattr(Linear, "_mixed_batch_forward", refuse)
        concatenated = server.forward(batch, rows).logits
    server.concatenate_mixed = False
    assert_close_reordered(server.forward(batch, rows).logits, concatenated, **TINY_FORWARD)
    server.concatenate_mixed = True
    # A LoRA bias is not in the concatenation: PEFT's adapter_names path, with the same guarantee.
    biased = make_adapter(tmp_path / "bias", tiny_model_dir, seed=8, lora_bias=True)
    server.load("bias", biased)
    rows = ["bias", "a0", "base", "bias"]
    mixed = server.forward(server.encode(PROMPTS), rows).logits
    for i, (prompt, name) in enumerate(zip(PROMPTS, rows, strict=True)):
        ids = server.tokenizer(prompt, return_tensors="pt")["input_ids"]
        folder = {"bias": biased, "a0": lora["a0"]}.get(name)
        assert_close_reordered(mixed[i, -ids.shape[1] :], reference_logits(tiny_model_dir, folder, ids), **TINY_FORWARD)
    # Beam search repeats rows inside generate: PEFT's path handles that too.
    rows = ["a1", "a0", "a2", "base"]
    beams = server.generate_ids(PROMPTS, rows, max_new_tokens=5, num_beams=2)
    for i, (prompt, name) in enumerate(zip(PROMPTS, rows, strict=True)):
        alone = server.generate_ids([prompt], name, max_new_tokens=5, num_beams=2)[0]
        assert torch.equal(beams[i, : len(alone)], alone)


def test_activate_switches_and_base_runs_alone(server, tiny_model_dir, lora):
    ids = server.tokenizer("switch me", return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids}
    assert server.active is None
    assert_close_reordered(server.forward(batch).logits[0], reference_logits(tiny_model_dir, None, ids), **TINY_FORWARD)
    for name in ("a1", "a0", "a2", "a1"):
        server.activate(name)
        assert server.active == name
        expected = reference_logits(tiny_model_dir, lora[name], ids)
        assert_close_reordered(server.forward(batch).logits[0], expected, **TINY_FORWARD, msg=str(name))
        with server.base():
            base_logits = server.forward(batch, adapters=None).logits[0]
        assert_close_reordered(base_logits, reference_logits(tiny_model_dir, None, ids), **TINY_FORWARD)
    server.activate("base")
    assert server.active is None
    assert_close_reordered(server.forward(batch).logits[0], reference_logits(tiny_model_dir, None, ids), **TINY_FORWARD)


def test_fast_switch_sets_the_same_state_as_peft(server):
    from peft.tuners.tuners_utils import BaseTunerLayer

    def layer_state():
        return [m.active_adapters for m in server.model.modules() if isinstance(m, BaseTunerLayer)]

    server.activate("a2")
    fast = (layer_state(), server.model.active_adapter)
    assert not any(p.requires_grad for p in server.model.parameters())
    server.model.set_adapter("a0", inference_mode=True)
    server.model.set_adapter("a2", inference_mode=True)
    assert fast == (layer_state(), server.model.active_adapter) == ([["a2"]] * len(fast[0]), "a2")


def test_one_adapter_per_call_leaves_the_active_one(server):
    server.activate("a1")
    server.generate(["x"], "a0", max_new_tokens=2)
    server.forward(server.encode(["x"]), adapters="a2")
    assert server.active == "a1" and server.model.active_adapter == "a1"


def test_unload(server, tiny_model_dir, lora):
    server.activate("a1")
    server.unload("a1")
    assert server.names == ["a0", "a2"] and server.active is None
    ids = server.tokenizer("gone", return_tensors="pt")["input_ids"]
    assert_close_reordered(
        server.forward({"input_ids": ids}).logits[0], reference_logits(tiny_model_dir, None, ids), **TINY_FORWARD
    )
    with pytest.raises(ConfigError, match=r"Adapter 'a1' is not loaded \(loaded: a0, a2\); load it first"):
        server.generate(["x"], ["a1"])
    server.unload("a0")
    server.unload("a2")
    assert server.names == []
    server.load("a1", lora["a1"])
    expected = reference_logits(tiny_model_dir, lora["a1"], ids)
    assert_close_reordered(server.forward({"input_ids": ids}, "a1").logits[0], expected, **TINY_FORWARD)


def merged_by_hand(base_dir, parts):
    """The base with W += Σ wᵢ · (alphaᵢ / rᵢ) · BᵢAᵢ on every targeted linear layer, read from the adapter files."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    for folder, weight in parts:
        config = json.loads((folder / "adapter_config.json").read_text())
        factor = weight * config["lora_alpha"] / config["r"]
        tensors = load_file(folder / "adapter_model.safetensors")
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace("lora_A", "lora_B")]
                module = model.get_submodule(key.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0])
                with torch.no_grad():
                    module.weight += factor * (b @ a)
    return model.eval()


def test_combine_cat_is_the_weighted_sum_of_deltas(server, tiny_model_dir, lora):
    server.load("r4", lora["r4"])
    weights = {"a0": 0.7, "r4": -0.4, "a2": 1.3}
    server.combine(list(weights), list(weights.values()), "mix", combination_type="cat")
    manual = merged_by_hand(tiny_model_dir, [(lora[n], w) for n, w in weights.items()])
    ids = server.tokenizer("combine these", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = manual(input_ids=ids).logits[0]
    combined = server.forward({"input_ids": ids}, "mix").logits[0]
    assert_close_reordered(combined, expected, **TINY_FORWARD)
    assert (combined - server.forward({"input_ids": ids}, "a0").logits[0]).abs().max() > 1e-2
    assert "mix" in server.names and server.active is None


def test_combine_linear_follows_its_formula(server, tiny_model_dir, lora):
    # linear combines A and B separately: delta = (Σ √(wᵢsᵢ)·Bᵢ)(Σ √(wᵢsᵢ)·Aᵢ), cross terms included.
    weights = [0.5, 2.0]
    server.combine(["a0", "a1"], weights, "lin", combination_type="linear")
    files = [load_file(lora[n] / "adapter_model.safetensors") for n in ("a0", "a1")]
    scaling = [w * 8 / 2 for w in weights]  # make_adapter: lora_alpha 8, r 2
    from transformers import AutoModelForCausalLM

    manual = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for key in files[0]:
        if ".lora_A." in key:
            a = sum(s**0.5 * f[key] for s, f in zip(scaling, files, strict=True))
            b = sum(s**0.5 * f[key.replace("lora_A", "lora_B")] for s, f in zip(scaling, files, strict=True))
            with torch.no_grad():
                manual.get_submodule(key.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]).weight += b @ a
    ids = server.tokenizer("linear", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = manual(input_ids=ids).logits[0]
    assert_close_reordered(server.forward({"input_ids": ids}, "lin").logits[0], expected, **TINY_FORWARD)


def test_combine_errors(server, tiny_model_dir, lora, tmp_path):
    server.load("r4", lora["r4"])
    with pytest.raises(ConfigError, match=r"needs adapters of one rank, got \{'a0': 2, 'r4': 4\}; use 'cat' or 'svd'"):
        server.combine(["a0", "r4"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ConfigError, match="must give one weight per adapter"):
        server.combine(["a0", "a1"], [1], "x")
    with pytest.raises(ConfigError, match="Adapter 'nope' is not loaded"):
        server.combine(["a0", "nope"], [1, 1], "x")
    with pytest.raises(ConfigError, match="`combination_type`='sum' is not one of cat, linear, svd"):
        server.combine(["a0", "a1"], [1, 1], "x", combination_type="sum")
    with pytest.raises(ConfigError, match="An adapter named 'a1' is already loaded"):
        server.combine(["a0", "a2"], [1, 1], "a1")
    server.load("rs", make_adapter(tmp_path / "rs", tiny_model_dir, seed=5, use_rslora=True))
    with pytest.raises(ConfigError, match=r"Adapters \['rs'\] \(`use_rslora`\) cannot be combined: .*#3761"):
        server.combine(["a0", "rs"], [1, 1], "x")
    assert "x" not in server.names


def test_mixed_batch_with_dora_and_different_ranks(tiny_model_dir, lora, tmp_path):
    server = AdapterServer(str(tiny_model_dir))
    dora = make_adapter(tmp_path / "dora", tiny_model_dir, seed=4, use_dora=True)
    server.load("dora", dora)
    server.load("r4", lora["r4"])
    rows = ["r4", "dora", "base", "dora"]
    mixed = server.forward(server.encode(PROMPTS), rows).logits  # PEFT cannot mix DoRA: run once per adapter
    generated = server.generate_ids(PROMPTS, rows, max_new_tokens=10)
    for i, (prompt, name) in enumerate(zip(PROMPTS, rows, strict=True)):
        ids = server.tokenizer(prompt, return_tensors="pt")["input_ids"]
        folder = {"r4": lora["r4"], "dora": dora}.get(name)
        assert_close_reordered(mixed[i, -ids.shape[1] :], reference_logits(tiny_model_dir, folder, ids), **TINY_FORWARD)
        alone = server.generate_ids([prompt], name, max_new_tokens=10)[0]
        assert torch.equal(generated[i, : len(alone)], alone)


def test_adapter_with_modules_to_save(tiny_model_dir, lora, tmp_path):
    # A fully trained lm_head copy lives in a PEFT wrapper with its own active state: switching must reach it.
    server = AdapterServer(str(tiny_model_dir))
    head = make_adapter(tmp_path / "head", tiny_model_dir, seed=6, modules_to_save=["lm_head"])
    server.load("head", head)
    server.load("a0", lora["a0"])
    rows = ["head", "a0", "base", "head"]
    mixed = server.forward(server.encode(PROMPTS), rows).logits
    for i, (prompt, name) in enumerate(zip(PROMPTS, rows, strict=True)):
        ids = server.tokenizer(prompt, return_tensors="pt")["input_ids"]
        folder = {"head": head, "a0": lora["a0"]}.get(name)
        expected = reference_logits(tiny_model_dir, folder, ids)
        assert_close_reordered(mixed[i, -ids.shape[1] :], expected, **TINY_FORWARD)
        server.activate(name)
        assert_close_reordered(server.forward({"input_ids": ids}).logits[0], expected, **TINY_FORWARD)


def test_quantized_base_serves_mixed_batches(tiny_model_dir, lora):
    pytest.importorskip("bitsandbytes")
    server = AdapterServer(str(tiny_model_dir), quantization="4bit")
    for name in ("a0", "a1"):
        server.load(name, lora[name])
    rows = ["a1", "a0", "base", "a0"]
    mixed = server.generate_ids(PROMPTS, rows, max_new_tokens=8)
    logits = server.forward(server.encode(PROMPTS), rows).logits
    for i, (prompt, name) in enumerate(zip(PROMPTS, rows, strict=True)):
        alone = server.generate_ids([prompt], name, max_new_tokens=8)[0]
        assert torch.equal(mixed[i, : len(alone)], alone)
        row_logits = server.forward(server.encode([prompt]), name).logits[0]
        assert_close_reordered(logits[i, -row_logits.shape[0] :], row_logits, **TINY_FORWARD)


# ---- checks before loading -------------------------------------------------------------------------------------


def test_adapter_for_another_architecture_is_refused(server, tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.num_hidden_layers = 64, 3
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    folder = make_adapter(tmp_path / "wide-adapter", tmp_path / "wide")
    with pytest.raises(ConfigError) as err:
        server.load("wide", folder)
    message = str(err.value)
    assert f"Adapter 'wide' ({folder}) does not fit this base model" in message
    assert "has 32 input features, the adapter's lora_A.weight has shape [2, 64]" in message
    assert "Load it onto the base it was trained on" in message and "more)" in message
    assert server.names == ["a0", "a1", "a2"]


def test_adapter_targeting_missing_modules_is_refused(server, lora, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(lora["a0"], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7.").replace("q_proj", "qkv"): v for k, v in tensors.items()}
    save_file(renamed, folder / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"targets model\.layers\.(0\.self_attn\.qkv|7\..*), which the base does not"):
        server.load("renamed", folder)
    assert "renamed" not in server.names


def test_adapter_file_missing_weights_is_refused(server, lora, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(lora["a0"], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "o_proj" not in k}, folder / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"targets 2 modules that adapter_model.safetensors has no weights for"):
        server.load("partial", folder)
    assert server.names == ["a0", "a1", "a2"]


def test_first_adapter_that_fails_to_load_leaves_the_base_untouched(tiny_model_dir, lora, tmp_path):
    folder = tmp_path / "bad-rank"
    shutil.copytree(lora["a0"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))  # tensors are rank 2
    server = AdapterServer(str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"Adapter 'bad' \(.*bad-rank\) could not be loaded onto"):
        server.load("bad", folder)
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert server.names == [] and not any(isinstance(m, BaseTunerLayer) for m in server.model.modules())
    server.load("a0", lora["a0"])
    ids = server.tokenizer("ok", return_tensors="pt")["input_ids"]
    expected = reference_logits(tiny_model_dir, lora["a0"], ids)
    assert_close_reordered(server.forward({"input_ids": ids}, "a0").logits[0], expected, **TINY_FORWARD)


def test_non_lora_and_pickle_adapters_are_refused(server, tiny_model_dir, lora, tmp_path):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), IA3Config()).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ConfigError, match=r"is IA3; serving many adapters on one base supports LoRA .*lpeft merge"):
        server.load("ia3", tmp_path / "ia3")
    marker = tmp_path / "unpickled"
    folder = pickle_only_adapter(lora["a0"], tmp_path / "bin", marker)
    with pytest.raises(ConfigError, match="no adapter_model.safetensors; pickle weights .* are never loaded"):
        server.load("bin", folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "source", "message"),
    [
        ("a0", "{a0}", "An adapter named 'a0' is already loaded"),
        ("base", "{a0}", "Adapter name 'base' is not usable"),
        ("has.dot", "{a0}", "Adapter name 'has.dot' is not usable"),
        ("new", "./no/such/folder", "is neither an existing folder nor a registry reference like 'org/name@^1'"),
    ],
)
def test_bad_names_and_sources(server, lora, name, source, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("^", r"\^")):
        server.load(name, source.format(a0=lora["a0"]))


def test_bad_rows(server):
    with pytest.raises(ConfigError, match="`adapters` names 2 adapters for a batch of 4 rows; give one per row"):
        server.generate(PROMPTS, ["a0", "a1"])
    with pytest.raises(ConfigError, match="A streamer follows one prompt at a time; got 4 prompts"):
        server.generate(PROMPTS, streamer=object())


def test_chat_template(server, tiny_model_dir):
    batch = server.encode(["Hi"], chat=True)
    text = server.tokenizer.decode(batch["input_ids"][0])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    server.tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template; send the prompts as plain text"):
        server.generate(["Hi"], chat=True)


def test_streamer_receives_the_generated_tokens(server):
    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    new = server.generate_ids(["stream"], "a1", max_new_tokens=6, streamer=streamer)
    prompt_length = server.encode(["stream"])["input_ids"].shape[1]
    assert len(streamer.chunks[0]) == prompt_length and streamer.chunks[-1] == "end"
    assert [t for chunk in streamer.chunks[1:-1] for t in chunk] == new[0].tolist()


# ---- registry references and the base fingerprint --------------------------------------------------------------


def test_registry_reference_is_pulled_once_and_fingerprint_checked(adapter, tiny_model_dir, tmp_path):
    from lightning_peft.hub import publish

    registry = tmp_path / "registry"
    publish(adapter, "acme/caps", registry=registry, verify=False)
    publish(adapter, "acme/caps", registry=registry, verify=False, bump="minor")
    server = AdapterServer(str(tiny_model_dir), registry=str(registry), cache_dir=tmp_path / "cache")
    folder = server.load("caps", "acme/caps@^1.0")
    assert folder.parts[-3:] == ("acme", "caps", "1.1.0") and (folder / "lpeft_manifest.json").is_file()
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    assert server.load("again", "acme/caps@1.1.0") == folder  # verified from the cache, not pulled again
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    ids = server.tokenizer("pulled", return_tensors="pt")["input_ids"]
    expected = reference_logits(tiny_model_dir, adapter, ids)
    assert_close_reordered(server.forward({"input_ids": ids}, "caps").logits[0], expected, **TINY_FORWARD)
    with pytest.raises(ConfigError, match=r"No published version satisfies '\^2'"):
        server.load("v2", "acme/caps@^2")
    with pytest.raises(ConfigError, match="acme/none has no published version in local registry"):
        server.load("none", "acme/none@^1")

    other_base = save_tiny_model(tmp_path / "other-base", seed=1)  # same shapes, other weights
    other = AdapterServer(str(other_base), registry=str(registry), cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"Adapter 'caps' \(.*1\.1\.0\): The base model .* is not the one"):
        other.load("caps", "acme/caps@^1")
    assert other.names == []
    with pytest.warns(UserWarning, match="used anyway because of --allow-base-mismatch"):
        other.load("caps", "acme/caps@^1", force=True)
    assert other.names == ["caps"]
