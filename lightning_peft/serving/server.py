"""`AdapterServer`: one base model, many LoRA adapters; load, switch, combine, and run mixed batches.

One `peft.PeftModel` holds every adapter. A batch whose rows all use one adapter runs on PEFT's ordinary path
with that adapter active; a batch that mixes plain LoRA adapters adds each row's own delta in every layer through
`ConcatenatedLora` (see `batched.py`), other mixes use PEFT's `adapter_names`; either equals running each row
alone. PEFT cannot mix DoRA adapters, adapters with `modules_to_save` or adapters on parameters (MoE experts) in
one batch: such a batch runs once per adapter instead, with the same results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.errors import ConfigError
from lightning_peft.serving.batched import ConcatenatedLora, batchable
from lightning_peft.serving.checks import (
    check_adapter,
    check_combinable,
    check_complete,
    check_fingerprint,
    check_new_name,
    check_token_rows,
    module_shapes,
)
from lightning_peft.serving.references import adapter_folder
from lightning_peft.serving.rows import (
    BASE,
    BASE_ALIASES,
    Prompt,
    check_generation,
    encode_prompts,
    generation_settings,
    group_rows,
    row_adapters,
    stitch_rows,
    with_positions,
)
from lightning_peft.serving.templates import adapter_tokenizer

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

COMBINATIONS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")  # fmt: skip


class AdapterServer:
    """One base model (quantized or not) serving many LoRA adapters.

    Args:
        model: An alias, a local model folder or a Hub id (`lightning_peft.models.resolve_model`).
        quantization: `none`, `8bit` or `4bit` (bitsandbytes), as in training.
        quantization_options: More `BitsAndBytesConfig` arguments.
        dtype: The base's float dtype (default: bfloat16 on GPUs that support it, float32 elsewhere).
        device: Where an unquantized base goes (default: the GPU when there is one, else the CPU).
        registry: Where registry references (`org/name@^1`) are pulled from: a `Registry`, `hf`, a URL or a
            folder (default: `$LPEFT_REGISTRY` or the default local registry).
        cache_dir: Where pulled packages are kept (default: `<lightning_peft cache>/adapters`).
        attn_implementation: The transformers attention backend ("auto": the best one the model implements).

    Attributes:
        concatenate_mixed: Run mixed batches of plain LoRA adapters through `ConcatenatedLora` (default);
            False uses PEFT's `adapter_names` loop for every mixed batch.
    """

    def __init__(
        self,
        model: str,
        *,
        quantization: str = "none",
        quantization_options: dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        device: str | None = None,
        registry: Any = None,
        cache_dir: str | os.PathLike | None = None,
        attn_implementation: str | None = "auto",
    ) -> None:
        import torch

        from lightning_peft.models import cache_root, dtype_for_precision, load_base_model, load_tokenizer

        self.base_name = model
        self.registry = registry
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "adapters"
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(model)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        base = load_base_model(
            model,
            quantization=quantization,
            quantization_options=quantization_options,
            dtype=dtype or dtype_for_precision(None),
            attn_implementation=attn_implementation,
        )
        if quantization == "none":
            base = base.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._base = base.eval().requires_grad_(False)
        self._shapes = module_shapes(self._base)
        self._peft: PeftModel | None = None
        self._active: str | None = None
        self._layers: list[Any] = []  # PEFT's tuner layers, for switching without walking the whole model
        self._wrapped_modules = False  # modules_to_save / trainable tokens: PEFT wrappers with their own state
        self.concatenate_mixed = True
        self._concatenated: ConcatenatedLora | None = None  # the last mixed batch's adapters, concatenated
        self._verified_fingerprints: set[str] = set()
        # Each adapter renders chat prompts with the template saved with it; `tokenizer.chat_template` is the base's.
        self._templates: dict[str, str | None] = {}

    # ---- state -----------------------------------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The `PeftModel` holding every adapter (the plain base before the first load)."""
        return self._peft if self._peft is not None else self._base

    @property
    def device(self) -> torch.device:
        return next(self._base.parameters()).device

    @property
    def names(self) -> list[str]:
        """The loaded adapters, in load order."""
        return list(self._peft.peft_config) if self._peft is not None else []

    @property
    def active(self) -> str | None:
        """The adapter used when `forward`/`generate` get no `adapters`; None means the base alone."""
        return self._active

    # ---- loading ---------------------------------------------------------------------------------------------

    def load(self, name: str, source: str | os.PathLike, *, force: bool = False) -> Path:
        """Load the LoRA adapter in `source` (a folder, or a registry reference `org/name@SPEC`) as `name`.

        The adapter is checked against the base before anything is loaded; `force` only turns a base
        fingerprint mismatch into a warning. The active adapter does not change.

        Returns:
            The folder the adapter was loaded from (the cache folder for a registry reference).

        Raises:
            ConfigError: a bad name or source, an adapter that does not fit the base, or pickle-only weights.
        """
        check_new_name(name, self.names)
        folder = adapter_folder(source, registry=self.registry, cache_dir=self.cache_dir)
        template = self._adapter_template(folder, name)
        config = check_adapter(folder, self._shapes, name=name)
        check_token_rows(config, self._peft.peft_config if self._peft is not None else {}, name=name, folder=folder)
        check_fingerprint(folder, self.base_name, name=name, force=force, verified=self._verified_fingerprints)
        self._load_checked(name, folder)
        self._templates[name] = template
        log.info("Loaded adapter %r from %s", name, folder)
        return folder

    def _adapter_template(self, folder: Path, name: str) -> str | None:
        """The chat template saved with the adapter (None: the base's applies), after growing the base's
        embeddings for tokens the adapter's tokenizer added (see `templates.adapter_tokenizer`)."""
        from lightning_peft.tokens import grow_embeddings

        template, adopt = adapter_tokenizer(folder, name, self.base_name, self.tokenizer, can_grow=self._peft is None)
        if adopt is not None:
            if grow_embeddings(self._base, len(adopt)):
                self._shapes = module_shapes(self._base)
            self.tokenizer = adopt
        return template

    def _load_checked(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PEFT notes a base_model_name_or_path other than ours; checked
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(self._base, str(folder), adapter_name=name)
                else:
                    self._peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            self._discard_partial(name)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"Adapter {name!r} ({folder}) could not be loaded onto {self.base_name}: {first}"
            ) from err
        self._peft.eval()
        self._refresh_layers()
        self._set_active(self._active)  # loading must not change which adapter is active
        try:
            check_complete(self._peft, name, folder)
        except ConfigError:
            self.unload(name)
            raise

    def _discard_partial(self, name: str) -> None:
        """Leave the server as it was before a failed load."""
        if self._peft is not None and name in self._peft.peft_config:
            self.unload(name)
        elif self._peft is None:
            _strip_tuner_layers(self._base)  # from_pretrained wrapped the base's layers before it failed

    def unload(self, name: str) -> None:
        """Remove adapter `name`; when it was active, the base becomes active."""
        self._require_loaded([name])
        others = [n for n in self.names if n != name]
        if others and self._peft.active_adapter == name:
            self._peft.set_adapter(
                others[0], inference_mode=True
            )  # so PEFT does not warn that the active adapter is deleted
        self._peft.delete_adapter(name)
        self._templates.pop(name, None)
        self._refresh_layers()
        if self._active == name:
            self._active = None

    # ---- switching -------------------------------------------------------------------------------------------

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter used by default (`None` or "base": the base alone)."""
        name = None if name in BASE_ALIASES else name
        if name is not None:
            self._require_loaded([name])
        self._set_active(name)

    def _set_active(self, name: str | None) -> None:
        self._active = name
        if name is None or self._peft is None:
            return
        if self._wrapped_modules:
            self._peft.set_adapter(name, inference_mode=True)
            return
        # PEFT's set_adapter walks every module and toggles requires_grad (~15 ms on SmolLM2); served adapters
        # are frozen, so setting each tuner layer's active adapter is the whole switch.
        active = [name]
        for layer in self._layers:
            layer._active_adapter = active
        self._peft.base_model.active_adapter = self._peft.active_adapter = name

    def _refresh_layers(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper

        modules = list(self._peft.modules())
        self._concatenated = None
        self._layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        # modules_to_save / trainable tokens keep their own state: PEFT's own switch handles them.
        self._wrapped_modules = any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules)

    @contextlib.contextmanager
    def base(self) -> Iterator[torch.nn.Module]:
        """Run the base model alone inside this block (PEFT's `disable_adapter`)."""
        if self._peft is None or not self.names:
            yield self.model
            return
        with self._peft.disable_adapter():
            yield self._peft

    def _require_loaded(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.names]
        if missing:
            loaded = ", ".join(self.names) or "none"
            raise ConfigError(f"Adapter {missing[0]!r} is not loaded (loaded: {loaded}); load it first.")

    # ---- combining -------------------------------------------------------------------------------------------

    def combine(
        self,
        names: Sequence[str],
        weights: Sequence[float],
        new_name: str,
        *,
        combination_type: str = "cat",
        **options: Any,
    ) -> None:
        """Add adapter `new_name`, a weighted combination of loaded adapters (PEFT's `add_weighted_adapter`).

        `cat` is exact (delta = Σ wᵢ·scaleᵢ·BᵢAᵢ, rank = Σ rᵢ); `linear` combines A and B separately (same
        ranks needed; an approximation); `svd` and the TIES/DARE variants take `svd_rank`, `density` etc.
        in `options`.

        Raises:
            ConfigError: unknown names or type, mismatched lengths or ranks, DoRA or non-LoRA adapters.
        """
        names = list(names)
        check_new_name(new_name, self.names)
        self._require_loaded(names)
        if not names or len(weights) != len(names):
            raise ConfigError(f"`weights` {list(weights)} must give one weight per adapter in {names}.")
        if combination_type not in COMBINATIONS:
            raise ConfigError(f"`combination_type`={combination_type!r} is not one of {', '.join(COMBINATIONS)}.")
        check_combinable([self._peft.peft_config[n] for n in names], names, combination_type)
        try:
            self._peft.add_weighted_adapter(
                names, list(weights), new_name, combination_type=combination_type, **options
            )
        except (ValueError, TypeError) as err:
            self._discard_partial(new_name)
            raise ConfigError(f"Adapters {names} cannot be combined with {combination_type!r}: {err}") from err
        self._templates[new_name] = self._templates.get(names[0])
        self._refresh_layers()
        self._set_active(self._active)

    # ---- running ---------------------------------------------------------------------------------------------

    def encode(
        self,
        prompts: Sequence[Prompt],
        *,
        chat: bool = False,
        adapters: str | Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Left-padded `input_ids`/`attention_mask` on the model's device.

        `chat` renders each prompt with the chat template of its row's adapter (the one saved with it, as in
        `forward`'s `adapters`), or the base's for rows of the base alone.
        """
        templates = None
        if chat:
            templates = [self._chat_template(row) for row in self._row_adapters(adapters, len(prompts))]
        return encode_prompts(self.tokenizer, prompts, self.device, templates)

    def chat_template(self, name: str | None = None) -> str:
        """The chat template `chat` prompts of adapter `name` are rendered with (None or "base": the base's).

        Raises:
            ConfigError: `name` is not loaded, or neither the adapter nor the base has a chat template.
        """
        name = BASE if name in BASE_ALIASES else name
        if name != BASE:
            self._require_loaded([name])
        return self._chat_template(name)

    def _chat_template(self, row: str) -> str:
        template = (None if row == BASE else self._templates.get(row)) or self.tokenizer.chat_template
        if not template:
            raise ConfigError(
                f"The tokenizer of {self.base_name!r} has no chat template; send the prompts as plain text "
                "(no --chat), or use an adapter trained with data.chat_template."
            )
        return template

    def forward(self, batch: dict[str, torch.Tensor], adapters: str | Sequence[str | None] | None = None) -> Any:
        """The model's output for `batch` (`input_ids`, optional `attention_mask`), each row with its adapter.

        Args:
            adapters: None (the active adapter for every row), one name for every row, or one per row;
                None or "base" in a list is the base model alone for that row.
        """
        from transformers.modeling_outputs import CausalLMOutputWithPast

        rows = self._row_adapters(adapters, len(batch["input_ids"]))
        batch = with_positions(batch)
        groups = self._groups_to_run_apart(rows)
        if groups is None:
            return self._forward_rows(batch, rows)
        parts = {
            name: self._forward_rows({k: v[index] for k, v in batch.items()}, [name] * len(index)).logits
            for name, index in groups.items()
        }
        return CausalLMOutputWithPast(logits=stitch_rows(parts, groups, len(rows)))

    def _forward_rows(self, batch: dict[str, torch.Tensor], rows: list[str]) -> Any:
        import torch

        with torch.no_grad(), self._routing(rows) as extra:
            return self.model(**batch, **extra)

    def generate(
        self,
        prompts: Sequence[Prompt],
        adapters: str | Sequence[str | None] | None = None,
        *,
        chat: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        streamer: Any = None,
        **kwargs: Any,
    ) -> list[str]:
        """Generate one completion per prompt, each row with its adapter, in one batch.

        Args:
            prompts: Texts, or chat message lists (with `chat`).
            adapters: As in `forward`.
            chat: Render prompts with the tokenizer's chat template.
            max_new_tokens: The most tokens generated per row.
            temperature: 0 is greedy decoding; above 0 samples (seed with `torch.manual_seed`).
            streamer: A transformers streamer (`TextStreamer`), for a single prompt.
            **kwargs: More `generate` arguments (`top_p`, `repetition_penalty` ...).

        Returns:
            The new text of each row, special tokens removed.
        """
        new_tokens = self.generate_ids(
            prompts, adapters, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature, streamer=streamer,
            **kwargs,
        )  # fmt: skip
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def generate_ids(
        self,
        prompts: Sequence[Prompt],
        adapters: str | Sequence[str | None] | None = None,
        *,
        chat: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        streamer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Like `generate`, but returns the new token ids (rows that stop early are padded with the pad token)."""
        check_generation(prompts, max_new_tokens, temperature, streamer)
        rows = self._row_adapters(adapters, len(prompts))
        encoded = self.encode(prompts, chat=chat, adapters=rows)
        templates = {self._chat_template(row) for row in rows} if chat else None
        settings = generation_settings(
            self.tokenizer, max_new_tokens, temperature, streamer, kwargs, templates, self._base.generation_config
        )
        groups = self._groups_to_run_apart(rows)
        if groups is None:
            return self._generate_rows(encoded, rows, settings)
        parts = {
            name: self._generate_rows({k: v[index] for k, v in encoded.items()}, [name] * len(index), settings)
            for name, index in groups.items()
        }
        return stitch_rows(parts, groups, len(rows), fill=settings["pad_token_id"])

    def _generate_rows(self, encoded: dict[str, torch.Tensor], rows: list[str], settings: dict[str, Any]) -> Any:
        import torch

        beams = settings.get("num_beams") or 1  # PEFT repeats each row's adapter over its beams
        with torch.no_grad(), self._routing(rows, concatenate=beams == 1) as extra:
            output = self.model.generate(**encoded, **settings, **extra)
        return output[:, encoded["input_ids"].shape[1] :]

    def _groups_to_run_apart(self, rows: list[str]) -> dict[str, list[int]] | None:
        """Rows by adapter when PEFT cannot mix these adapters in one batch; None when it can.

        PEFT refuses DoRA in mixed batches, and its modules_to_save wrapper fails on a row whose adapter has no
        copy of that module (peft 0.21). LoRA on parameters (`target_parameters`: MoE experts) sees the tokens
        routed to each expert, not the batch's rows, so no per-row delta can be applied there.
        """
        configs = [self._peft.peft_config[n] for n in set(rows) - {BASE}]
        apart = any(getattr(c, "use_dora", False) or getattr(c, "target_parameters", None) for c in configs)
        if len(set(rows)) == 1 or not (apart or self._wrapped_modules):
            return None
        return group_rows(rows)

    def _row_adapters(self, adapters: str | Sequence[str | None] | None, size: int) -> list[str]:
        rows = row_adapters(adapters, size, self._active)
        self._require_loaded(sorted({r for r in rows if r != BASE}))
        return rows

    @contextlib.contextmanager
    def _routing(self, rows: list[str], *, concatenate: bool = True) -> Iterator[dict[str, Any]]:
        """How to run a batch: the base alone, one adapter active, or mixed (concatenated or PEFT's own)."""
        unique = set(rows)
        if unique == {BASE}:
            with self.base():
                yield {}
        elif len(unique) == 1:
            previous = self._active
            self._set_active(rows[0])
            try:
                yield {}
            finally:
                self._set_active(previous)
        elif concatenate and self.concatenate_mixed and batchable(self._layers, sorted(unique - {BASE})):
            with self._concatenated_lora(rows):
                yield {}
        else:
            yield {"adapter_names": rows}

    @contextlib.contextmanager
    def _concatenated_lora(self, rows: list[str]) -> Iterator[None]:
        """Mixed rows through `ConcatenatedLora`, with PEFT's own adapters switched off in every layer."""
        names = tuple(sorted(set(rows) - {BASE}))
        if self._concatenated is None or self._concatenated.names != names:
            self._concatenated = ConcatenatedLora(self._layers, names)
        saved = [layer._active_adapter for layer in self._layers]
        for layer in self._layers:
            layer._active_adapter = []
        try:
            with self._concatenated.applied(rows):
                yield
        finally:
            for layer, active in zip(self._layers, saved, strict=True):
                layer._active_adapter = active


def _strip_tuner_layers(model: torch.nn.Module) -> None:
    """Put the base layers back where PEFT wrapped them (undoing a failed first load)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, module.get_base_layer())
