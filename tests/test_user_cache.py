"""The machine's cache: where it is, one builder under concurrency, damaged or unfinished entries
rebuilt and never loaded, a builder killed mid-way, and the data and target caches on top of it."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from lit_unlearn.user_cache import MANIFEST, build_once, cache_root, damage


def test_the_cache_is_the_users_not_the_working_directorys(monkeypatch, tmp_path):
    monkeypatch.delenv("LIT_UNLEARN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == str(tmp_path / "home" / ".cache" / "lit_unlearn")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == str(tmp_path / "xdg" / "lit_unlearn")
    monkeypatch.setenv("LIT_UNLEARN_CACHE", str(tmp_path / "mine"))
    assert cache_root() == str(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIT_UNLEARN_CACHE", "relative")
    assert cache_root() == str(tmp_path / "relative")  # fixed when asked, not when used


def _write(folder: str, text: str = "payload") -> None:
    Path(folder, "data.bin").write_text(text * 100)
    os.makedirs(os.path.join(folder, "sub"))
    Path(folder, "sub", "meta.json").write_text("{}")


def test_an_entry_is_built_once_then_reused(tmp_path):
    builds = []
    path = str(tmp_path / "entry")
    assert build_once(path, lambda f: builds.append(1) or _write(f), "thing")
    assert not build_once(path, lambda f: builds.append(1) or _write(f), "thing")
    assert builds == [1] and damage(path) is None
    assert json.loads(Path(path, MANIFEST).read_text())["files"].keys() == {
        "data.bin",
        os.path.join("sub", "meta.json"),
    }


@pytest.mark.parametrize(
    "harm, reason",
    [
        (lambda p: Path(p, "data.bin").write_text("payload" * 99 + "paylaod"), "checksum"),
        (lambda p: os.truncate(os.path.join(p, "data.bin"), 10), "bytes"),
        (lambda p: os.remove(os.path.join(p, "sub", "meta.json")), "differ"),
        (lambda p: os.remove(os.path.join(p, MANIFEST)), "no manifest"),
        (lambda p: Path(p, MANIFEST).write_text("{not json"), "unreadable"),
    ],
    ids=["flipped", "truncated", "missing file", "unsealed", "bad manifest"],
)
def test_a_damaged_entry_is_rebuilt_never_loaded(tmp_path, caplog, harm, reason):
    path = str(tmp_path / "entry")
    build_once(path, _write, "thing")
    harm(path)
    assert reason in damage(path)
    with caplog.at_level(logging.WARNING):
        assert build_once(path, lambda f: _write(f, "fresh"), "thing")
    assert "thing" in caplog.text and "rebuilding" in caplog.text
    assert damage(path) is None and Path(path, "data.bin").read_text() == "fresh" * 100
    assert sorted(os.listdir(tmp_path)) == ["entry", "entry.lock"]  # nothing left beside it


def _slow_builder(path: str, log: str, barrier) -> None:
    barrier.wait()  # every process asks at the same moment

    def build(folder: str) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        _write(folder, str(os.getpid()))

    build_once(path, build, "shared")


def test_concurrent_builders_build_once_and_all_reuse_it(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    path, log = str(tmp_path / "entry"), str(tmp_path / "builds.log")
    procs = [ctx.Process(target=_slow_builder, args=(path, log, barrier)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    (builder,) = Path(log).read_text().split()
    assert Path(path, "data.bin").read_text() == builder * 100 and damage(path) is None


def _killed_builder(path: str, started: str) -> None:
    def build(folder: str) -> None:
        _write(folder)
        Path(started).touch()
        time.sleep(60)

    build_once(path, build, "interrupted")


def test_a_builder_killed_mid_way_leaves_nothing_that_loads(tmp_path):
    path, started = str(tmp_path / "entry"), str(tmp_path / "started")
    proc = multiprocessing.get_context("spawn").Process(target=_killed_builder, args=(path, started))
    proc.start()
    deadline = time.time() + 60
    while not os.path.exists(started) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not os.path.exists(path)  # only a temporary sibling; the lock died with the process
    assert build_once(path, lambda f: _write(f, "next"), "interrupted")
    assert Path(path, "data.bin").read_text() == "next" * 100


def _corpus_dm(tokenizer_dir, path, **kw):
    from lit_unlearn.data import TextCorpus, UnlearningDataModule

    return UnlearningDataModule(
        tokenizer_dir, TextCorpus(path), TextCorpus(path), max_length=16, forget_batch_size=2, **kw
    )


def test_the_example_cache_lives_in_the_machine_cache_and_heals(
    synthetic_tokenizer_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("LIT_UNLEARN_CACHE", str(tmp_path / "machine"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"alice was born in {i} " * (i % 4 + 1)}) + "\n" for i in range(30))
    )
    monkeypatch.chdir(tmp_path)
    dm = _corpus_dm(synthetic_tokenizer_dir, str(corpus))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_dir == str(tmp_path / "machine" / "data")
    (entry,) = [e for e in os.listdir(dm.cache_dir) if e not in ("validated",) and not e.endswith(".lock")]
    arrow = os.path.join(dm.cache_dir, entry, "examples.arrow")
    plain = _corpus_dm(synthetic_tokenizer_dir, str(corpus), cache_dir=None)
    plain.setup("fit")
    with open(arrow, "r+b") as handle:  # damage the stored tokens
        handle.seek(os.path.getsize(arrow) // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING):
        healed = _corpus_dm(synthetic_tokenizer_dir, str(corpus))
        healed.prepare_data()
        healed.setup("fit")
    assert "damaged" in caplog.text
    assert len(healed.forget_examples) == len(plain.forget_examples)
    assert all(
        torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(healed.forget_examples, plain.forget_examples)
    )
    assert not (tmp_path / ".cache").exists()  # nothing in the working directory


def test_a_damaged_synthetic_target_is_not_reused(smoke_target, tmp_path):
    import shutil

    from lit_unlearn.benchmarks.synthetic.target import TargetRecipe, _cached

    recipe = TargetRecipe(**json.loads(Path(smoke_target, "recipe.json").read_text()))
    assert _cached(Path(smoke_target), recipe) is not None
    copy = tmp_path / "target"
    shutil.copytree(smoke_target, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    assert _cached(copy, recipe) is None
