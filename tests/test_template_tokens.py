"""Template tokens the base lacks: new embedding rows trained alone, the base unchanged, plain PEFT loading.

The base is the tiny Llama with a base model's tokenizer (no chat template, no `<|im_start|>`/`<|im_end|>`);
`chat_template: chatml` adds those two tokens as ids 259 and 260.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import quiet_trainer, run_card_snippet
from safetensors import safe_open
from tiny import save_tiny_model
from tolerance import TINY_FORWARD, assert_close_reordered

from lightning_peft import PeftCausalLM
from lightning_peft.data import SFTDataModule
from lightning_peft.data.chat_templates import BUILTIN
from lightning_peft.errors import ConfigError
from lightning_peft.tokens import with_trainable_tokens

NEW_IDS = [259, 260]  # after the byte tokenizer's 3 special tokens and 256 bytes


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("base-llama")
    return save_tiny_model(folder, chat=False, tie_word_embeddings=request.param)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rows = [
        {"messages": [{"role": "user", "content": f"say {c}"}, {"role": "assistant", "content": c * 3}]}
        for c in "abcdefgh"
    ]
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def base_weights(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return model, model.get_input_embeddings().weight.detach().clone(), model.lm_head.weight.detach().clone()


def train(base_dir, chat_file, tmp_path, **module_kwargs):
    module = PeftCausalLM(
        str(base_dir), adapter={"r": 4}, learning_rate=0.05, chat_template="chatml", adapter_dir=str(tmp_path / "ad"),
        **module_kwargs,
    )  # fmt: skip
    data = SFTDataModule(chat_file, tokenizer=str(base_dir), chat_template="chatml", batch_size=4)
    quiet_trainer(tmp_path, max_steps=4).fit(module, datamodule=data)
    return module


def test_only_the_new_rows_train_and_plain_peft_loads_the_adapter(base_dir, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    _, embed_before, head_before = base_weights(base_dir)
    module = train(base_dir, chat_file, tmp_path)
    model = module.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    deltas = [n for n in trainable if "trainable_tokens_delta" in n]
    tied = model.get_base_model().config.tie_word_embeddings
    assert len(deltas) == (1 if tied else 2)  # an untied lm_head gets rows of its own
    # The base's rows are untouched; the new rows moved from where resizing put them.
    embeddings = model.get_input_embeddings()
    assert embeddings.original_module.weight.shape[0] == 261
    assert torch.equal(embeddings.original_module.weight[:259], embed_before)
    head = model.get_output_embeddings()
    assert torch.equal(getattr(head, "original_module", head).weight[:259], head_before)
    for layer in (embeddings, head):  # the same rows when tied; the lm_head's own (trained by the loss) when not
        delta = layer.token_adapter.trainable_tokens_delta["default"]
        assert not torch.equal(delta, layer.original_module.weight[NEW_IDS])

    folder = tmp_path / "ad"
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert all("lora_" in k or "token_adapter.trainable_tokens_delta" in k for k in keys)  # never the whole matrix
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 261 and tokenizer.chat_template == BUILTIN["chatml"].source

    # Plain PEFT: the base, grown to the saved tokenizer's size, then the adapter.
    plain_base, _, _ = base_weights(base_dir)
    plain_base.resize_token_embeddings(len(tokenizer))
    plain = PeftModel.from_pretrained(plain_base, str(folder)).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "say a"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids[0, 0].item() == 259
    model.eval()
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
    # Same weights; the two models may still pick other kernels (another module layout): reordered sums at most.
    assert_close_reordered(got, expected, **TINY_FORWARD)


def test_adapter_path_brings_its_tokenizer_and_template(base_dir, chat_file, tmp_path):
    train(base_dir, chat_file, tmp_path)
    again = PeftCausalLM(str(base_dir), adapter_path=str(tmp_path / "ad"))
    again.configure_model()
    assert again.tokenizer.chat_template == BUILTIN["chatml"].source
    assert again.model.get_input_embeddings().original_module.weight.shape[0] == 261
    text = again.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>")
    assert isinstance(again.generate("say a", max_new_tokens=3), str)
    # A template that would add more tokens to a saved adapter is refused.
    other = PeftCausalLM(str(base_dir), adapter_path=str(tmp_path / "ad"), chat_template="llama3")
    with pytest.raises(ConfigError, match=r"`data.chat_template`='llama3' adds tokens .* lacks"):
        other.configure_model()


def test_methods_without_trainable_tokens_are_refused(base_dir):
    module = PeftCausalLM(str(base_dir), adapter={"class_path": "peft.IA3Config"}, chat_template="chatml")
    with pytest.raises(ConfigError, match=r"adds 2 tokens .* only a LoRA adapter can train .* IA3Config"):
        module.configure_model()


def test_bad_template_fails_at_construction(base_dir):
    with pytest.raises(ConfigError, match=r"`data.chat_template`='nope' is not a built-in template"):
        PeftCausalLM(str(base_dir), chat_template="nope")


def test_trainable_indices_given_by_the_user_are_kept(base_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = with_trainable_tokens(LoraConfig(trainable_token_indices=[5, 259]), model, NEW_IDS)
    indices = config.trainable_token_indices
    if model.config.tie_word_embeddings:
        assert indices == [5, 259, 260]
    else:
        assert indices == {"model.embed_tokens": [5, 259, 260], "lm_head": NEW_IDS}


def test_merge_grows_the_base_and_keeps_the_tokens(base_dir, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.merging import merge_adapter

    module = train(base_dir, chat_file, tmp_path)
    report = merge_adapter(tmp_path / "ad", tmp_path / "merged", base=str(base_dir))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(tokenizer) == 261 and tokenizer.chat_template == BUILTIN["chatml"].source
    assert merged.get_input_embeddings().weight.shape[0] == 261
    ids = torch.tensor([[259, 70, 71, 260, 72]])
    module.model.eval()
    with torch.no_grad():
        expected, got = module.model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert report.passed and report.max_abs_logit_diff <= report.tolerance
    # Merged == unmerged in fp32 within the merge's own tolerance (1e-4), on a text with both new tokens: their
    # trained rows are merged into the grown matrices, not dropped.
    torch.testing.assert_close(got, expected, rtol=0, atol=report.tolerance)


def test_server_adopts_the_adapters_vocabulary_and_template(base_dir, chat_file, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.adapters import save_adapter
    from lightning_peft.serving import AdapterServer

    module = train(base_dir, chat_file, tmp_path)
    plain = tmp_path / "plain"  # an adapter trained without a template: the base's tokenizer
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2))
    save_adapter(peft_model, plain, AutoTokenizer.from_pretrained(base_dir))

    server = AdapterServer(str(base_dir))
    server.load("plain", plain)
    with pytest.raises(ConfigError, match=r"Adapter 'chat' .* vocabulary of 261 tokens that this server's \(259"):
        server.load("chat", tmp_path / "ad")

    server = AdapterServer(str(base_dir))
    server.load("chat", tmp_path / "ad")
    server.load("again", tmp_path / "ad")  # adapters with the same added tokens share the server
    with pytest.raises(ConfigError, match=r"Adapter 'plain' .* trains no token rows, unlike the adapters loaded"):
        server.load("plain", plain)  # PEFT cannot mix adapters with and without trainable tokens
    assert len(server.tokenizer) == 261 and server.tokenizer.chat_template is None  # the base's own
    batch = server.encode(["Hi"], chat=True, adapters="chat")
    assert server.tokenizer.decode(batch["input_ids"][0]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ConfigError, match="has no chat template; send the prompts as plain text"):
        server.encode(["Hi"], chat=True, adapters="base")
    # The same greedy answer as the trained module gives with its in-memory adapter, alone or in a mixed batch.
    module.model.eval()
    expected = module.generate("say a", 4)
    assert server.generate(["say a"], "chat", chat=True, max_new_tokens=4) == [expected]
    assert server.generate(["say a", "say a"], ["again", "chat"], chat=True, max_new_tokens=4) == [expected] * 2


class EndTurnAt:
    """A logits processor that writes `fill` up to the `at`-th new token, `token` there, and anything but
    `token` or EOS after it: where generation stops depends only on the stop tokens it was given."""

    def __init__(self, token: int, at: int, fill: int = 100, eos: int = 2):
        self.token, self.at, self.fill, self.eos, self.start = token, at, fill, eos, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        if step <= self.at:
            forced = self.token if step == self.at else self.fill
            scores[:] = float("-inf")
            scores[:, forced] = 0.0
        else:
            scores[:, [self.token, self.eos]] = float("-inf")
        return scores


def test_chat_replies_stop_at_the_templates_end_of_turn(base_dir, chat_file, tmp_path):
    from transformers import LogitsProcessorList

    from lightning_peft.serving import AdapterServer

    module = train(base_dir, chat_file, tmp_path)
    server = AdapterServer(str(base_dir))
    server.load("chat", tmp_path / "ad")

    def forced():
        return LogitsProcessorList([EndTurnAt(260, 2)])  # <|im_end|> as the third new token

    # The base's EOS is </s> (2): without the template's end-of-turn token, plain prompts run to max_new_tokens.
    chat = server.generate_ids(["say a"], "chat", chat=True, max_new_tokens=8, logits_processor=forced())
    plain = server.generate_ids(["say a"], "chat", max_new_tokens=8, logits_processor=forced())
    assert chat.shape[1] == 3 and chat[0, 2].item() == 260
    assert plain.shape[1] == 8 and plain[0, 2].item() == 260
    module.model.eval()
    answer = module.generate("say a", max_new_tokens=8, logits_processor=forced())
    assert answer == server.tokenizer.decode(chat[0], skip_special_tokens=True)


def test_the_published_cards_usage_snippet_loads_the_tokens_and_the_logits(base_dir, chat_file, tmp_path):
    """The card's PEFT snippet, run as written (the Hub names pointed at local folders): it takes the adapter's
    tokenizer, grows the base for the added tokens, and gives the trained model's logits."""
    from huggingface_hub import ModelCard

    from lightning_peft.hub import PackageSpec, package_adapter

    module = train(base_dir, chat_file, tmp_path)
    spec = PackageSpec(name="acme/chatml-tokens", version="1.0.0", base_model_id="acme-labs/tiny-base")
    package = package_adapter(tmp_path / "ad", tmp_path / "pkg", spec)
    text = ModelCard.load(package.path / "README.md").text
    assert "resize_token_embeddings(len(tokenizer))" in text
    scope = run_card_snippet(
        text,
        {
            '"acme-labs/tiny-base"': repr(str(base_dir)),
            '"acme/chatml-tokens", revision="v1.0.0"': repr(str(package.path)),
        },
    )
    tokenizer = scope["tokenizer"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "say a"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids[0, 0].item() == NEW_IDS[0]
    module.model.eval()
    with torch.no_grad():
        expected, got = module.model(input_ids=ids).logits, scope["model"].eval()(input_ids=ids).logits
    assert_close_reordered(got, expected, **TINY_FORWARD)
