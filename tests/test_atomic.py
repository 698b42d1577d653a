"""lightning_peft.atomic: whole files and folders or nothing, fsynced, with the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from lightning_peft import atomic
from lightning_peft.errors import ConfigError


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_and_bytes_have_the_umask_permissions_not_mkstemps(tmp_path, umask):
    text = atomic.write_text(tmp_path / "sub" / "a.txt", "héllo\n")
    data = atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert text.read_text(encoding="utf-8") == "héllo\n" and data.read_bytes() == b"\x00\x01"
    assert _mode(text) == _mode(data) == 0o666 & ~umask
    assert _leftovers(tmp_path) == _leftovers(tmp_path / "sub") == []


def test_write_replaces_a_file_and_fsyncs_it_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "index.json"
    path.write_text("old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.write_text(path, "new")
    assert path.read_text() == "new"
    assert events[:2] == ["fsync", "replace"] and events[2:] == ["fsync"]  # the file, then the folder entry


@pytest.mark.parametrize("fail", ["write", "fsync", "replace"])
def test_a_failed_file_write_leaves_the_old_file_and_nothing_else(tmp_path, monkeypatch, fail):
    path = tmp_path / "run.yaml"
    path.write_text("old")

    def boom(*args, **kwargs):
        raise OSError(f"{fail} failed")

    if fail == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    if fail == "replace":
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match=f"{fail} failed"), atomic.staged_file(path) as staging:
        staging.write_text("half")
        if fail == "write":
            boom()
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_staged_folder_permissions_follow_the_umask(tmp_path, umask):
    target = tmp_path / "out"
    with atomic.staged_folder(target) as staging:
        (staging / "nested").mkdir()
        private = staging / "nested" / "weights.bin"
        private.write_bytes(b"w")
        private.chmod(0o600)  # as mkstemp in a library would leave it
    assert _mode(target) == _mode(target / "nested") == 0o777 & ~umask
    assert _mode(target / "nested" / "weights.bin") == 0o666 & ~umask
    assert _leftovers(tmp_path) == []


def test_staged_folder_fsyncs_every_file_and_folder(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic, "fsync_file", lambda path: synced.append(path.name))
    monkeypatch.setattr(atomic, "fsync_dir", lambda path: synced.append(path.name + "/"))
    with atomic.staged_folder(tmp_path / "out") as staging:
        (staging / "a").write_text("a")
        (staging / "d").mkdir()
        (staging / "d" / "b").write_text("b")
    assert {"a", "b", "d/"} <= set(synced) and synced[-1] == f"{tmp_path.name}/"


def test_a_failed_folder_write_leaves_the_old_folder_and_nothing_else(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(RuntimeError, match="stopped"), atomic.staged_folder(target, overwrite=True) as staging:
        (staging / "half").write_text("half")
        raise RuntimeError("stopped")
    assert [p.name for p in target.iterdir()] == ["keep"] and _leftovers(tmp_path) == []


def test_overwrite_replaces_a_folder_or_a_link_without_leftovers(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic.staged_folder(target, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    link = tmp_path / "last"
    link.symlink_to(target, target_is_directory=True)
    folder = atomic.staging_folder(link)
    (folder / "copy").write_text("c")
    atomic.replace_folder(folder, link)
    assert not link.is_symlink() and [p.name for p in link.iterdir()] == ["copy"]
    assert (target / "new").exists() and _leftovers(tmp_path) == []


def test_a_non_empty_target_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "x").write_text("x")
    with pytest.raises(ConfigError, match=r"`--to` .*out exists and is not empty; .* pass --overwrite"):
        atomic.check_target(target)
    (tmp_path / "file").write_text("f")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        atomic.check_target(tmp_path / "file", overwrite=True)
    assert _leftovers(tmp_path) == []


def test_staging_names_are_hidden_siblings_checkpoint_recovery_recognises(tmp_path):
    from lightning_peft.callbacks.checkpoint_folder import _hidden_parts

    for kind in ("partial", "old", "deleting", "link"):
        name = atomic.staging_name(tmp_path / "step=3", kind)
        assert name.parent == tmp_path and _hidden_parts(name.name) == ("step=3", kind)
