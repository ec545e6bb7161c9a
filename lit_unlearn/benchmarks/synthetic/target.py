"""Build (or reuse) the synthetic target model: a tiny Llama that knows every fictitious person.

One command, cached on disk::

    lit-unlearn-target                               # default: 200 people, 1,500 steps
    lit-unlearn-target --num_people 20 --steps 150   # smoke scale (seconds)
    lit-unlearn-target --oracle true                 # retrain oracle: never sees the forget people

The recipe (docs/benchmark.md): AdamW lr 1e-2, betas (0.9, 0.98), 100 warm-up steps then cosine to
10 %, gradient clipping 1.0, batches of 64 documents of which 20 % general text, loss on every
token. Training runs through a Lightning ``Trainer`` with automatic optimization. The result is
saved with ``save_pretrained`` (model + tokenizer + ``recipe.json`` + ``metrics.json``) and reused
when the recipe matches.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_unlearn.benchmarks.synthetic.corpus import (
    SyntheticCorpus,
    build_tokenizer,
    encode_document,
    generate_corpus,
)
from lit_unlearn.data.collate import pad_examples
from lit_unlearn.rundir import atomic_directory
from lit_unlearn.schedule import lr_schedule
from lit_unlearn.terminal import once
from lit_unlearn.user_cache import cache_root, damage, seal

SCHEME = "synthetic://"
PRESETS: dict[str, dict[str, Any]] = {  # folder names under the machine's cache
    "default": {"output_dir": "synthetic-target"},
    "smoke": {"output_dir": "synthetic-smoke", "num_people": 20, "steps": 150},
    "oracle": {"output_dir": "synthetic-oracle", "oracle": True},  # the default target's retrain oracle
}


def target_dir(name: str = "default") -> str:
    """Where ``synthetic://<name>`` is cached: ``<machine cache>/synthetic-target`` (``default``),
    ``synthetic-smoke`` (``smoke``); ``oracle`` is the default target's retrain oracle."""
    folder = PRESETS[name]["output_dir"]
    return os.path.join(cache_root(), folder)


def tiny_llama(
    vocab_size: int,
    hidden: int = 64,
    intermediate: int = 192,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 64,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> torch.nn.Module:
    """A small ``LlamaForCausalLM`` built from a config (untied embeddings), for the synthetic benchmark."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class TargetRecipe:
    """Everything that determines the target model; a cached model is reused only if it matches."""

    num_people: int = 200
    forget_fraction: float = 0.1
    corpus_seed: int = 0
    train_seed: int = 0
    steps: int = 1500
    batch_size: int = 64
    general_fraction: float = 0.2
    lr: float = 1e-2
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    schedule: str = "get_scheduler:cosine_with_min_lr"  # part of the cache key: which schedule code ran
    hidden: int = 64
    intermediate: int = 192
    layers: int = 2
    heads: int = 4
    max_positions: int = 64
    oracle: bool = False


class PretrainBatches(torch.utils.data.Dataset):
    """Batch ``s`` of pre-training; the document draw is fixed in ``__init__`` from the seed."""

    def __init__(self, corpus: SyntheticCorpus, tokenizer: Any, recipe: TargetRecipe) -> None:
        people = corpus.retain_people if recipe.oracle else list(range(len(corpus.people)))
        self.knowledge = [encode_document(d, tokenizer, "all") for d in corpus.person_docs(people)]
        self.general = [encode_document(d, tokenizer, "all") for d in corpus.general_docs]
        self.pad_id = tokenizer.pad_token_id
        n_general = round(recipe.general_fraction * recipe.batch_size)
        gen = torch.Generator().manual_seed(recipe.train_seed)
        self.knowledge_idx = torch.randint(
            len(self.knowledge), (recipe.steps, recipe.batch_size - n_general), generator=gen
        )
        self.general_idx = torch.randint(len(self.general), (recipe.steps, n_general), generator=gen)

    def __len__(self) -> int:
        return self.knowledge_idx.shape[0]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        docs = [self.knowledge[i] for i in self.knowledge_idx[step].tolist()]
        docs += [self.general[i] for i in self.general_idx[step].tolist()]
        return pad_examples(docs, self.pad_id)


class CausalLMPretraining(L.LightningModule):
    """Plain next-token pre-training with warm-up + cosine decay (automatic optimization).

    Args:
        model: the causal LM to train.
        recipe: optimizer and schedule settings.
    """

    def __init__(self, model: torch.nn.Module, recipe: TargetRecipe) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("pretrain/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        r = self.recipe
        opt = torch.optim.AdamW(self.model.parameters(), lr=r.lr, betas=(0.9, 0.98), weight_decay=0.0)
        sched = lr_schedule(
            opt, r.steps, decay="cosine", warmup_steps=r.warmup_steps, min_lr_ratio=r.min_lr_ratio
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _cached(output_dir: Path, recipe: TargetRecipe) -> dict[str, Any] | None:
    if not output_dir.is_dir():
        return None
    problem = damage(str(output_dir))
    if problem is not None:  # a damaged or unfinished copy is rebuilt, never loaded
        once(f"target: the cached model in {output_dir} is not usable ({problem}); rebuilding it")
        return None
    try:
        saved = json.loads((output_dir / "recipe.json").read_text())
        metrics = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved != asdict(recipe) or not (output_dir / "config.json").exists():
        return None
    return metrics


def build_target(
    output_dir: str | None = None,
    num_people: int = 200,
    forget_fraction: float = 0.1,
    corpus_seed: int = 0,
    train_seed: int = 0,
    steps: int = 1500,
    oracle: bool = False,
    force: bool = False,
    threads: int | None = 1,
    accelerator: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Build the synthetic target (or the retrain oracle) and return its probe metrics.

    Args:
        output_dir: where the model, tokenizer, recipe and metrics are saved (default: the
            machine's cache, ``synthetic-target`` or ``synthetic-oracle`` in it).
        num_people: corpus size (200 for the benchmark; 20 for smoke runs).
        forget_fraction: share of people that the unlearning runs will forget.
        corpus_seed: seed of the generated corpus.
        train_seed: seed of the document draw and the initialisation.
        steps: optimizer steps (1,500 reaches ~100 % probe accuracy).
        oracle: leave the forget people out of pre-training (the retrain oracle).
        force: rebuild even if a matching cached model exists.
        threads: torch CPU threads (1 is fastest for this tiny model); ``None`` leaves it.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        progress: show Lightning's progress bar.
    """
    recipe = TargetRecipe(
        num_people=num_people,
        forget_fraction=forget_fraction,
        corpus_seed=corpus_seed,
        train_seed=train_seed,
        steps=steps,
        oracle=oracle,
    )
    out = Path(output_dir or target_dir("oracle" if oracle else "default"))
    if not force and (metrics := _cached(out, recipe)) is not None:
        once(f"target: reusing cached model in {out}")
        return metrics
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may ask at once (DDP ranks, parallel runs or tests): one builds, the others
    # wait and then reuse what it wrote.
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if not force and (metrics := _cached(out, recipe)) is not None:
            once(f"target: reusing cached model in {out}")
            return metrics
        return _build(out, recipe, threads, accelerator, progress)


def _build(
    out: Path, recipe: TargetRecipe, threads: int | None, accelerator: str, progress: bool
) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    from lit_unlearn.benchmarks.synthetic.probes import synthetic_metrics

    start = time.perf_counter()
    L.seed_everything(recipe.train_seed, verbose=False)
    corpus = generate_corpus(recipe.num_people, recipe.forget_fraction, recipe.corpus_seed)
    tokenizer = build_tokenizer(corpus)
    model = tiny_llama(
        len(tokenizer),
        recipe.hidden,
        recipe.intermediate,
        recipe.layers,
        recipe.heads,
        recipe.max_positions,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    module = CausalLMPretraining(model, recipe)
    loader = torch.utils.data.DataLoader(
        PretrainBatches(corpus, tokenizer, recipe), batch_size=None, shuffle=False
    )
    trainer = L.Trainer(
        max_steps=recipe.steps,
        accelerator=accelerator,
        devices=1,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    model = module.model.cpu().eval()
    metrics = {k: round(v, 4) for k, v in synthetic_metrics(model, tokenizer, corpus).items()}
    metrics["build_seconds"] = round(time.perf_counter() - start, 1)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    # Write to a temporary sibling and rename: an interrupted build leaves no half-written cache.
    with atomic_directory(str(out), replace=True) as folder:
        tmp = Path(folder)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        seal(folder)
    print(f"target: saved to {out}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics


def resolve_synthetic(name_or_path: str) -> str:
    """Map ``synthetic://default`` / ``smoke`` / ``oracle`` to a built (or cached) target directory.

    Any other string is returned unchanged (a hub id or a local path).
    """
    if not name_or_path.startswith(SCHEME):
        return name_or_path
    preset = name_or_path[len(SCHEME) :]
    if preset not in PRESETS:
        raise ValueError(
            f"unknown synthetic target {name_or_path!r}; expected one of {[SCHEME + p for p in PRESETS]}"
        )
    out = target_dir(preset)
    build_target(**{**PRESETS[preset], "output_dir": out}, threads=None)
    return out


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lit-unlearn-target``."""
    from jsonargparse import CLI, ArgumentError

    from lit_unlearn.errors import UserError, run_reporting_errors

    def run() -> None:
        try:
            CLI(build_target, args=args, as_positional=False, exit_on_error=False)
        except ArgumentError as err:
            raise UserError(" ".join(str(err).split())) from err

    run_reporting_errors("lit-unlearn-target", run)


if __name__ == "__main__":
    main()
