"""Shared builders for engine tests: a tiny float64 Llama, QA-pair data with equal label counts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_unlearn.benchmarks.synthetic import tiny_llama
from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus
from lit_unlearn.callbacks import engine_callbacks
from lit_unlearn.data import QAPairs, UnlearningDataModule
from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.models import load_tokenizer

PEOPLE = 20


def write_probe_pairs(directory: str) -> tuple[str, str]:
    """Forget/retain QA files from the synthetic probes: every example has exactly 2 label tokens
    (answer + EOS), so token means over micro-batches equal token means over their union."""
    corpus = generate_corpus(PEOPLE)
    paths = []
    for split, people in (("forget", corpus.forget_people), ("retain", corpus.retain_people)):
        path = os.path.join(directory, f"{split}.jsonl")
        with open(path, "w") as handle:
            for kind in ("qa", "statement"):
                for p in corpus.probes_for(kind, people):
                    handle.write(json.dumps({"question": p.prompt, "answer": p.answer}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


ANSWER_LENGTHS = (1, 18, 2, 9, 1, 15, 4, 1, 12, 6, 17, 3)


ALTERNATE_LENGTHS = (3, 1, 11, 2, 7, 14, 1, 5)


def write_varlen_pairs(directory: str) -> tuple[str, str]:
    """Forget/retain QA files whose answers range from 1 to 18 words (2 to 19 label tokens with
    EOS): per-micro-batch or per-rank token means then differ from the effective batch's mean, so
    only an exactly normalised engine passes the equivalence tests on them. Forget records carry
    an ``alternate`` answer of 1 to 14 words (for IdkDPO), padded in a sub-batch of its own."""
    corpus = generate_corpus(PEOPLE)
    words = " ".join(d.text for d in corpus.person_docs(corpus.retain_people)).split()
    paths = []
    for split, people in (("forget", corpus.forget_people), ("retain", corpus.retain_people)):
        path = os.path.join(directory, f"varlen-{split}.jsonl")
        probes = [p for kind in ("qa", "statement") for p in corpus.probes_for(kind, people)][:24]
        with open(path, "w") as handle:
            for i, p in enumerate(probes):
                n = ANSWER_LENGTHS[i % len(ANSWER_LENGTHS)]
                answer = " ".join(words[(7 * i) % 200 : (7 * i) % 200 + n])
                record = {"question": p.prompt, "answer": answer}
                if split == "forget":
                    k = ALTERNATE_LENGTHS[i % len(ALTERNATE_LENGTHS)]
                    record["alternate"] = " ".join(words[(5 * i + 3) % 200 : (5 * i + 3) % 200 + k])
                handle.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def make_model(
    tokenizer_dir: str, dtype: torch.dtype = torch.float64, seed: int = 0, hidden: int = 32
) -> torch.nn.Module:
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = tiny_llama(
        len(tok),
        hidden=hidden,
        intermediate=64,
        layers=2,
        heads=2,
        max_positions=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return model.to(dtype).train()


def make_dm(
    tokenizer_dir: str, forget_path: str, retain_path: str, batch: int = 2, seed: int = 0, **kw: Any
) -> UnlearningDataModule:
    return UnlearningDataModule(
        tokenizer_dir,
        QAPairs(forget_path),
        QAPairs(retain_path),
        max_length=32,
        forget_batch_size=batch,
        retain_batch_size=batch,
        seed=seed,
        **kw,
    )


def sgd(lr: float = 0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def fit(
    module: UnlearningModule,
    dm: UnlearningDataModule,
    max_steps: int,
    ckpt_path: str | None = None,
    **trainer_kw: Any,
) -> L.Trainer:
    """A quiet one-device CPU Trainer; ``ckpt_path`` resumes."""
    kw: dict[str, Any] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    given = list(trainer_kw.pop("callbacks", []))
    kw.update(trainer_kw)
    # the guards and the step logger, as lit-unlearn fit installs them (a given guard replaces its default)
    defaults = [cb for cb in engine_callbacks() if not any(type(g) is type(cb) for g in given)]
    trainer = L.Trainer(**kw, callbacks=[*defaults, *given])
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """Equal weights. The default tolerance is float32 rounding, not float64: Hugging Face's
    LlamaRMSNorm computes in float32 even for a float64 model, so two backward passes and one
    backward of the sum differ at ~1e-7 relative (measured: 7.6e-8 on one gradient). A wrong
    engine (missing 1/k, swapped weights, a lost micro-batch) is off by ~1e-2."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def relative_difference(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> float:
    """max |a - b| over all weights, relative to the largest change of ``b`` from ``initial``."""
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    update = max((b[k] - initial[k]).abs().max().item() for k in a)
    assert update > 1e-4, "the runs did not train"
    return diff / update


def interrupted_and_uninterrupted(
    make_module: Callable[[], UnlearningModule],
    make_data: Callable[[], UnlearningDataModule],
    checkpoint_dir: Any,
    every: int,
    steps: int,
) -> tuple[UnlearningModule, UnlearningModule]:
    """Train ``steps`` optimizer steps (float64) saving a checkpoint every ``every``, then train a
    fresh module from the step-``every`` checkpoint to ``steps``; returns (uninterrupted, resumed)."""
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, every_n_train_steps=every, save_top_k=-1
    )
    full = make_module()
    fit(full, make_data(), max_steps=steps, precision="64-true", enable_checkpointing=True, callbacks=[ckpt])
    path = sorted(Path(checkpoint_dir).glob(f"*step={every}.ckpt"))
    assert path, list(Path(checkpoint_dir).iterdir())
    resumed = make_module()
    fit(resumed, make_data(), max_steps=steps, precision="64-true", ckpt_path=str(path[0]))
    return full, resumed
