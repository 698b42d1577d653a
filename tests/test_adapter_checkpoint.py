"""AdapterCheckpoint: PEFT folders with the resume state, top-k and last, atomic writes, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import resume_worker
import torch
from helpers import adapter_tensors, quiet_trainer, token_batches
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import Checkpoint
from peft import PeftModel
from safetensors.torch import load_file
from tolerance import TINY_FORWARD, assert_close_reordered
from transformers import AutoModelForCausalLM

from lightning_peft import PeftCausalLM
from lightning_peft.callbacks import AdapterCheckpoint
from lightning_peft.callbacks.checkpoint_folder import (
    MARKER_FILE,
    STATE_FILE,
    _pack,
    _unpack,
    is_complete,
    newest_checkpoint,
    read_checkpoint,
)
from lightning_peft.data.collate import LengthGroupedSampler, ResumableDataLoader, ShuffleSampler
from lightning_peft.errors import ConfigError, CorruptFileError

FOLDER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", STATE_FILE, MARKER_FILE}
WORKER = Path(__file__).with_name("resume_worker.py")


def make_module(tiny_model_dir, **kwargs) -> PeftCausalLM:
    kwargs.setdefault("adapter", {"r": 4, "lora_dropout": 0.1})
    return PeftCausalLM(str(tiny_model_dir), learning_rate=1e-2, save_adapter_on_fit_end=False, **kwargs)


def fit(tiny_model_dir, root, checkpoint, max_steps, ckpt_path=None, callbacks=(), n_batches=4):
    seed_everything(0)
    module = make_module(tiny_model_dir)
    trainer = quiet_trainer(
        root, max_steps=max_steps, callbacks=[checkpoint, *callbacks], enable_checkpointing=True, log_every_n_steps=1
    )
    trainer.fit(module, train_dataloaders=token_batches(n_batches=n_batches), ckpt_path=ckpt_path)
    return module, trainer


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


# ---- what a checkpoint folder holds ----------------------------------------------------------------------------


def test_each_checkpoint_is_a_peft_adapter_with_the_resume_state_and_no_frozen_weight(tiny_model_dir, tmp_path):
    dirpath = tmp_path / "ckpt"
    checkpoint = AdapterCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1)
    module, trainer = fit(tiny_model_dir, tmp_path, checkpoint, max_steps=4)

    assert {p.name for p in dirpath.iterdir()} == {"epoch=0-step=2", "epoch=0-step=4", "last"}
    for folder in dirpath.iterdir():
        assert {p.name for p in folder.iterdir()} == FOLDER_FILES, folder
        assert is_complete(folder)
    state = torch.load(dirpath / "last" / STATE_FILE, weights_only=True)
    # The adapter weights live in the PEFT file only; the frozen base is nowhere.
    assert set(state["adapter_state_keys"]) == module.adapter_state_keys() and state["state_dict"] == {}
    assert state["global_step"] == 4 and state["optimizer_states"] and state["lr_schedulers"] and state["loops"]
    assert state["callbacks"][checkpoint.state_key]["rng_states"][0]["torch"].dtype == torch.uint8
    assert json.loads((dirpath / "last" / MARKER_FILE).read_text())["global_step"] == 4

    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(logits(PeftModel.from_pretrained(base, dirpath / "last"), ids), logits(module.model, ids))
    # The resume state: adapter rebuilt from the PEFT file, optimizer state bit for bit.
    restored = read_checkpoint(dirpath / "last")
    for key, value in adapter_tensors(module).items():
        assert torch.equal(restored["state_dict"][key], value), key
    live = trainer.optimizers[0].state_dict()["state"]
    for index, values in restored["optimizer_states"][0]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, live[index][name]), (index, name)
    # An older folder: its PEFT file and its resume state describe the same adapter.
    older = make_module(tiny_model_dir)
    older.configure_model()
    older.load_state_dict(read_checkpoint(dirpath / "epoch=0-step=2")["state_dict"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = PeftModel.from_pretrained(base, dirpath / "epoch=0-step=2")
    assert torch.equal(logits(peft, ids), logits(older.model, ids))
    assert not torch.equal(logits(peft, ids), logits(module.model, ids))


def test_top_k_keeps_the_best_by_the_monitored_metric_and_last_is_the_newest(tiny_model_dir, tmp_path):
    class Losses(Callback):
        def __init__(self):
            self.by_step = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.by_step[trainer.global_step] = float(outputs["loss"])

    losses, dirpath = Losses(), tmp_path / "ckpt"
    checkpoint = AdapterCheckpoint(dirpath, "{step}", monitor="train_loss", save_top_k=2, every_n_train_steps=1)
    fit(tiny_model_dir, tmp_path, checkpoint, max_steps=6, callbacks=[losses])

    best_two = sorted(losses.by_step, key=losses.by_step.get)[:2]
    assert {p.name for p in dirpath.iterdir()} == {f"step={s}" for s in best_two} | {"last"}
    assert checkpoint.best_model_path == str(dirpath / f"step={best_two[0]}")
    assert newest_checkpoint([dirpath]) == dirpath / "last"
    assert json.loads((dirpath / "last" / MARKER_FILE).read_text())["global_step"] == 6


def test_last_can_be_a_link_and_is_brought_up_to_the_final_step(tiny_model_dir, tmp_path):
    dirpath = tmp_path / "ckpt"
    checkpoint = AdapterCheckpoint(dirpath, "{step}", save_last="link", every_n_train_steps=2)
    fit(tiny_model_dir, tmp_path, checkpoint, max_steps=4)
    assert (dirpath / "last").is_symlink() and (dirpath / "last").resolve() == dirpath / "step=4"
    assert newest_checkpoint([dirpath]) == dirpath / "step=4"
    # fit ending between two scheduled saves: `last` gets the final step anyway (a copy, not a stale link).
    checkpoint = AdapterCheckpoint(dirpath, "{step}", save_last="link", every_n_train_steps=2)
    fit(tiny_model_dir, tmp_path, checkpoint, max_steps=5, ckpt_path="last", n_batches=8)
    assert not (dirpath / "last").is_symlink() and read_checkpoint(dirpath / "last")["global_step"] == 5
    assert {p.name for p in dirpath.iterdir()} == {"step=4", "last"}


@pytest.mark.parametrize(
    "adapter",
    [
        {"class_path": "PromptTuningConfig", "init_args": {"num_virtual_tokens": 3}},  # PEFT renames its tensor
        {"class_path": "IA3Config"},
        {"r": 4, "use_dora": True},
    ],
    ids=["prompt_tuning", "ia3", "dora"],
)
def test_other_peft_methods_save_loadable_adapters_and_resume(tiny_model_dir, tmp_path, adapter):
    seed_everything(0)
    module = make_module(tiny_model_dir, adapter=adapter)
    checkpoint = AdapterCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=token_batches())
    folder = tmp_path / "ckpt" / "last"
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    assert_close_reordered(logits(peft, ids), logits(module.model, ids), **TINY_FORWARD)
    restored = read_checkpoint(folder)["state_dict"]
    assert restored.keys() == module.adapter_state_keys()
    assert all(torch.equal(restored[k], v) for k, v in adapter_tensors(module).items())
    resumed = make_module(tiny_model_dir, adapter=adapter)
    again = AdapterCheckpoint(tmp_path / "ckpt", "{step}")
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[again], enable_checkpointing=True)
    trainer.fit(resumed, train_dataloaders=token_batches(), ckpt_path=folder)
    assert trainer.global_step == 3


# ---- atomicity: half-written folders are never checkpoints ------------------------------------------------------


def test_half_written_folders_are_never_taken_for_last_or_best(tiny_model_dir, tmp_path):
    dirpath = tmp_path / "ckpt"
    checkpoint = AdapterCheckpoint(dirpath, "{step}", every_n_train_steps=2, save_top_k=-1)
    fit(tiny_model_dir, tmp_path, checkpoint, max_steps=4)
    state = read_checkpoint(dirpath / "step=2")["callbacks"][checkpoint.state_key]
    # A staging folder, a folder without its marker and one with a short file, all "newer" than `last`.
    shutil.copytree(dirpath / "last", dirpath / ".step=6.partial-x1y2z3w4")
    shutil.copytree(dirpath / "last", dirpath / "step=8")
    (dirpath / "step=8" / MARKER_FILE).unlink()
    shutil.copytree(dirpath / "last", dirpath / "step=9")
    with (dirpath / "step=9" / "adapter_model.safetensors").open("r+b") as f:
        f.truncate(100)
    assert not is_complete(dirpath / "step=8") and not is_complete(dirpath / "step=9")
    assert newest_checkpoint([dirpath]) == dirpath / "last"
    with pytest.raises(ConfigError, match="not a complete AdapterCheckpoint folder"):
        read_checkpoint(dirpath / "step=9")
    # The right sizes but damaged bytes (a disk or copy error): the file is named, with the way out.
    for name, reason in (("adapter_model.safetensors", "incomplete safetensors header"), (STATE_FILE, "")):
        shutil.copytree(dirpath / "last", dirpath / "damaged")
        (dirpath / "damaged" / name).write_bytes(b"\xff" * (dirpath / "damaged" / name).stat().st_size)
        with pytest.raises(CorruptFileError, match=rf"damaged/{name} is damaged \({reason}.*\): resume from another"):
            read_checkpoint(dirpath / "damaged")
        shutil.rmtree(dirpath / "damaged")

    # Top-k bookkeeping restored from a checkpoint forgets entries that are incomplete or gone.
    restored = AdapterCheckpoint(dirpath, "{step}", every_n_train_steps=2, save_top_k=-1)
    restored.load_state_dict(
        {**state, "best_k_models": {str(dirpath / n): torch.tensor(0.0) for n in ("step=2", "step=8", "step=7")}}
    )
    assert list(restored.best_k_models) == [str(dirpath / "step=2")]
    assert restored.best_model_path == restored.kth_best_model_path == str(dirpath / "step=2")

    # A run stopped between the two renames that replace `last`: the old `last` is put back.
    os.rename(dirpath / "last", dirpath / ".last.old-0a1b2c3d")
    assert newest_checkpoint([dirpath]) == dirpath / "last" and is_complete(dirpath / "last")

    # Resuming cleans the leftovers up.
    _, trainer = fit(tiny_model_dir, tmp_path, restored, max_steps=6, ckpt_path="last")
    assert trainer.ckpt_path == str(dirpath / "last")
    assert not [p.name for p in dirpath.iterdir() if p.name.startswith(".")]


# ---- exact resume after SIGKILL (a real subprocess) --------------------------------------------------------------


@pytest.fixture
def one_thread():
    # The killed run uses one thread (resume_worker.train): the same reduction order here, then restore.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """12 steps without a stop (4 epochs of 3 batches): per-step losses and a checkpoint every 2 steps."""
    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("uninterrupted")
    try:
        resume_worker.train(tiny_model_dir, folder, max_steps=12)
    finally:
        torch.set_num_threads(threads)
    return folder


def run_until_paused(tiny_model_dir, work, max_steps, *flags) -> None:
    """Start the worker, wait until it pauses where `flags` say, and SIGKILL it."""
    work.mkdir(parents=True)
    with (work / "log.txt").open("w") as log:
        command = [sys.executable, str(WORKER), str(tiny_model_dir), str(work), "--max-steps", str(max_steps), *flags]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not (work / "paused").exists():
            assert process.poll() is None, (work / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never reached its pause"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL


@pytest.mark.parametrize(
    ("where", "flags", "max_steps", "resumes_at"),
    [
        ("at an epoch boundary", ["--pause-at-step", "6"], 12, 6),
        ("in mid-epoch", ["--pause-at-step", "4"], 8, 4),
        ("while a checkpoint is written", ["--stall-save-at-step", "6"], 8, 4),
    ],
)
def test_resume_after_sigkill_continues_exactly(
    tiny_model_dir, tmp_path, uninterrupted, one_thread, where, flags, max_steps, resumes_at
):
    work = tmp_path / "run"
    run_until_paused(tiny_model_dir, work, max_steps, *flags)
    dirpath = work / "checkpoints"
    # The newest complete checkpoint survived the kill and is a loadable adapter; a stalled write left staging only.
    assert newest_checkpoint([dirpath]) == dirpath / "last"
    assert read_checkpoint(dirpath / "last")["global_step"] == resumes_at
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), dirpath / "last")
    staged = [p.name for p in dirpath.iterdir() if p.name.startswith(".")]
    if flags[0] == "--stall-save-at-step":
        assert len(staged) == 1 and staged[0].startswith(".step=6.partial-"), staged
    else:
        assert staged == []

    _, trainer = resume_worker.train(tiny_model_dir, work, max_steps=max_steps, ckpt_path="last")

    assert trainer.ckpt_path == str(dirpath / "last") and trainer.global_step == max_steps
    expected = load_file(uninterrupted / "checkpoints" / f"step={max_steps}" / "adapter_model.safetensors")
    got = load_file(dirpath / f"step={max_steps}" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    # Every logged step, from the killed run and the resumed one (steps redone after the kill appear twice).
    reference = dict(resume_worker.read_losses(uninterrupted))
    logged = resume_worker.read_losses(work)
    assert sorted({step for step, _ in logged}) == list(range(1, max_steps + 1))
    assert all(abs(loss - reference[step]) <= 1e-6 for step, loss in logged), (logged, reference)


# ---- `lpeft fit`: AdapterCheckpoint by default, --ckpt_path last ----------------------------------------------------


def write_run_config(tmp_path, tiny_model_dir, **trainer):
    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"model_name_or_path": str(tiny_model_dir), "adapter": {"r": 2}, "save_adapter_on_fit_end": False},
        "data": {"train_file": str(data), "val_fraction": 0.34, "max_length": 64, "batch_size": 2},
        "trainer": {
            "max_steps": 3,
            "default_root_dir": str(tmp_path / "runs"),
            "enable_progress_bar": False,
            **trainer,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    return path


def test_lpeft_fit_checkpoints_adapters_and_resumes_from_last(tmp_path, tiny_model_dir):
    from lightning_peft.cli.lightning import run_lightning_cli

    config = str(write_run_config(tmp_path, tiny_model_dir))
    first = run_lightning_cli(["fit", "--config", config])
    checkpoints = [c for c in first.trainer.callbacks if isinstance(c, Checkpoint)]
    assert len(checkpoints) == 1 and type(checkpoints[0]) is AdapterCheckpoint
    # Defaults: <log_dir>/checkpoints, a save at each epoch end (also when max_steps ends one), top-1 and `last`.
    saved = Path(first.trainer.log_dir) / "checkpoints"
    assert saved.parent.name == "version_0"
    assert {p.name for p in saved.iterdir()} == {"epoch=1-step=3", "last"}
    assert read_checkpoint(saved / "last")["global_step"] == 3

    second = run_lightning_cli(["fit", "--config", config, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    # The new run logs into version_1; `last` is found in version_0's checkpoints.
    assert second.trainer.ckpt_path == str(saved / "last") and second.trainer.global_step == 5
    assert read_checkpoint(Path(second.trainer.log_dir) / "checkpoints" / "last")["global_step"] == 5


def test_lpeft_fit_keeps_a_configured_checkpoint_callback_or_none(tmp_path, tiny_model_dir):
    from lightning_peft.cli.lightning import run_lightning_cli

    config = str(write_run_config(tmp_path, tiny_model_dir, max_steps=1, logger=False))
    own = {"class_path": "lightning_peft.callbacks.AdapterCheckpoint", "init_args": {"every_n_train_steps": 1}}
    cli = run_lightning_cli(["fit", "--config", config, "--trainer.callbacks", json.dumps([own])])
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, Checkpoint)]
    assert len(checkpoints) == 1 and checkpoints[0]._every_n_train_steps == 1
    cli = run_lightning_cli(["fit", "--config", config, "--trainer.enable_checkpointing", "false"])
    assert not any(isinstance(c, Checkpoint) for c in cli.trainer.callbacks)


# ---- resumable data ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize(
    "sampler",
    [ShuffleSampler(11, seed=3), LengthGroupedSampler(list(range(11)), 3, seed=3)],
    ids=["shuffle", "grouped"],
)
def test_a_resumed_loader_yields_the_rest_of_its_epoch(sampler, num_workers):
    def loader():
        return ResumableDataLoader(list(range(11)), batch_size=3, sampler=sampler, num_workers=num_workers)

    sampler.set_epoch(2)
    epoch = [batch.tolist() for batch in loader()]
    first = loader()
    iterator = iter(first)
    seen = [next(iterator).tolist(), next(iterator).tolist()]
    assert first.state_dict() == {"epoch": 2, "batches": 2}

    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    sampler.set_epoch(0)
    iterator = iter(resumed)  # Lightning creates the iterator before it calls set_epoch
    sampler.set_epoch(2)
    assert seen + [batch.tolist() for batch in iterator] == epoch and len(resumed) == 4
    assert resumed.state_dict() == {"epoch": 2, "batches": 4}
    assert [batch.tolist() for batch in resumed] == epoch  # the skip applies to one epoch only

    later = loader()
    later.load_state_dict({"epoch": 1, "batches": 2})  # the checkpoint's epoch is over: nothing is skipped
    assert len(list(later)) == 4


def test_shuffle_sampler_order_follows_seed_and_epoch():
    sampler = ShuffleSampler(50, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and list(ShuffleSampler(50, seed=1)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and list(ShuffleSampler(50, seed=2)) != first


# ---- smaller pieces ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1024,), (33, 65), (4, 8, 40)])
def test_optimizer_state_packing_is_lossless(shape):
    tensor = torch.randn(shape) * torch.logspace(-8, 2, shape[-1])
    tensor.view(-1)[:7] = torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-45, -3e38, 1.0])
    packed = _pack(tensor)
    assert packed["data"].dtype == torch.uint8 and packed["data"].numel() < tensor.numel() * 4
    assert torch.equal(_unpack(packed).view(torch.int32), tensor.view(torch.int32))
    small = torch.randn(10)
    assert _pack(small) is small


def test_configuration_errors():
    with pytest.raises(ConfigError, match=r"`filename`='.\{step\}' must be a non-empty name that does not start"):
        AdapterCheckpoint(filename=".{step}")
    from lightning_peft.callbacks.checkpoint_folder import find_peft_model

    with pytest.raises(ConfigError, match="needs a LightningModule holding a peft.PeftModel; Linear has none"):
        find_peft_model(torch.nn.Linear(2, 2))
