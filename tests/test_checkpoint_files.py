"""Checkpoint files: written beside their destination and renamed (the old one survives any
failure), digests that catch corrupted bytes, one-line refusals, leftovers cleared."""

from __future__ import annotations

import errno
import json
import os
import zipfile

import pytest
import torch

from lit_unlearn.checkpoint_files import (
    DIGEST_KEY,
    VerifiedCheckpointIO,
    check_checkpoint,
    remove_orphans,
    replace_directory,
    replace_file,
    tensor_digest,
    write_directory_digest,
)
from lit_unlearn.errors import UserError


def _checkpoint(scale: float = 1.0) -> dict:
    return {
        "state_dict": {
            "w": torch.arange(12.0).reshape(3, 4) * scale,
            "b": torch.ones(3, dtype=torch.bfloat16),
        },
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}}],
        "lit_unlearn": {"rng_cpu": torch.get_rng_state()},
        "global_step": 3,
    }


def test_a_failing_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old and complete")

    def full_disk(handle):
        handle.write(b"half of the new checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        replace_file(str(path), full_disk)
    assert path.read_bytes() == b"old and complete"
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_the_new_file_replaces_the_old_one_with_normal_permissions(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")
    replace_file(str(path), lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["last.ckpt"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_tensor_digest_sees_one_changed_element_and_nothing_else():
    a, b = _checkpoint(), _checkpoint()
    assert tensor_digest(a) == tensor_digest(b)
    b["state_dict"]["w"][1, 2] += 1e-6
    assert tensor_digest(a) != tensor_digest(b)
    c = _checkpoint()
    c["global_step"] = 4  # not a tensor: not part of the digest
    assert tensor_digest(c) == tensor_digest(a)
    assert tensor_digest({**a, DIGEST_KEY: "anything"}) == tensor_digest(a)


def _save(tmp_path, name="last.ckpt") -> str:
    path = str(tmp_path / name)
    VerifiedCheckpointIO().save_checkpoint(_checkpoint(), path)
    return path


def test_a_saved_checkpoint_loads_back_equal_without_its_digest(tmp_path):
    loaded = VerifiedCheckpointIO().load_checkpoint(_save(tmp_path))
    assert DIGEST_KEY not in loaded
    assert torch.equal(loaded["state_dict"]["w"], _checkpoint()["state_dict"]["w"])


def _flip_a_tensor_byte(path: str) -> None:
    """Flip one byte inside the stored bytes of the first tensor (the archive stays readable)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 8)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(handle.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len
        handle.seek(start + 5)
        byte = handle.read(1)
        handle.seek(start + 5)
        handle.write(bytes([byte[0] ^ 0x10]))


def test_corrupted_tensor_bytes_load_silently_with_torch_but_are_refused_here(tmp_path):
    path = _save(tmp_path)
    _flip_a_tensor_byte(path)
    plain = torch.load(path, weights_only=True)  # what torch alone does: no error
    assert DIGEST_KEY in plain
    with pytest.raises(UserError, match=r"--ckpt_path .*last.ckpt: corrupted"):
        VerifiedCheckpointIO().load_checkpoint(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2), "not a PyTorch checkpoint archive"),
        (lambda p: open(p, "wb").close(), "the file is empty"),
        (lambda p: open(p, "w").write("not a checkpoint"), "not a PyTorch checkpoint archive"),
        (lambda p: torch.save({"model": torch.zeros(2)}, p), "not a lit-unlearn training checkpoint"),
    ],
    ids=["truncated", "empty", "text", "foreign torch file"],
)
def test_damaged_or_foreign_checkpoints_are_one_line_errors_naming_the_file(tmp_path, damage, message):
    path = _save(tmp_path)
    damage(path)
    with pytest.raises(UserError) as err:
        VerifiedCheckpointIO().load_checkpoint(path)
    text = str(err.value)
    assert path in text and message in text and "\n" not in text


def test_a_model_or_run_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a training checkpoint"):
        check_checkpoint(str(tmp_path))
    with pytest.raises(UserError, match="file not found"):
        check_checkpoint(str(tmp_path / "missing.ckpt"))


def test_a_sharded_checkpoint_directory_is_checked_against_its_file_digests(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.mkdir()
    (ckpt / "meta.pt").write_bytes(b"meta")
    (ckpt / "__0_0.distcp").write_bytes(b"shard zero")
    write_directory_digest(str(ckpt))
    check_checkpoint(str(ckpt))
    assert set(json.loads((ckpt / "lit_unlearn_digest.json").read_text())) == {"meta.pt", "__0_0.distcp"}
    (ckpt / "__0_0.distcp").write_bytes(b"shard zerO")
    with pytest.raises(UserError, match=r"corrupted \(1 file\(s\) differ.*__0_0.distcp"):
        check_checkpoint(str(ckpt))


def test_leftovers_of_killed_saves_are_removed_and_a_moved_aside_checkpoint_is_put_back(tmp_path):
    (tmp_path / ".last.ckpt.tmp-123-abcd").write_bytes(b"partial")
    (tmp_path / ".unlearned_model.tmp-9-ffff").mkdir()
    (tmp_path / ".unlearned_model.tmp-9-ffff" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".sharded.ckpt.old-1234").mkdir()  # the swap died between its two renames
    (tmp_path / "keep.txt").write_text("user file")
    removed = remove_orphans(str(tmp_path))
    assert len(removed) == 3
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "sharded.ckpt"]


def test_replace_directory_swaps_a_whole_directory(tmp_path):
    old, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.tmp-1-a"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    replace_directory(str(new), str(old))
    assert (old / "a").read_text() == "new" and os.listdir(tmp_path) == ["last.ckpt"]
