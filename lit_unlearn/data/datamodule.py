"""The LightningDataModule that feeds every step one forget batch and one retain batch.

Batches look like ``{"forget": {input_ids, attention_mask, labels}, "retain": {...}}``, with
``labels = -100`` on tokens that carry no loss. Pairing is decided by
:class:`~lit_unlearn.data.sampling.PairedBatchSampler` (seeded from the run seed and the epoch,
rank-aware), so results do not depend on ``num_workers`` and resuming continues the sequence.
Use ``Trainer(use_distributed_sampler=False)``: the sampler already shards by rank (the
``lit-unlearn`` CLI sets this).
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch.utils.data import DataLoader

from lit_unlearn.data.cache import (
    cached_examples,
    data_files,
    mark_validated,
    settings_hash,
    source_identity,
    validated,
)
from lit_unlearn.data.collate import PaddedExamples, PairedBatches, pad_examples
from lit_unlearn.data.sampling import PairedBatchSampler
from lit_unlearn.data.sources import ALTERNATE, DataSource, Example
from lit_unlearn.errors import UserError
from lit_unlearn.models import load_tokenizer
from lit_unlearn.user_cache import cache_root

log = logging.getLogger(__name__)


def _as_list(sources: DataSource | list[DataSource] | None) -> list[DataSource]:
    if sources is None:
        return []
    return list(sources) if isinstance(sources, (list, tuple)) else [sources]


class UnlearningDataModule(L.LightningDataModule):
    """Interleaves forget and retain batches for two-task unlearning.

    Args:
        tokenizer: hub id or path (linked to the model's).
        forget: one or more forget sources.
        retain: one or more retain sources.
        max_length: longest sequence in tokens (paper: 512).
        forget_batch_size: forget sequences per device per micro-batch.
        retain_batch_size: retain sequences per device per micro-batch (default: as forget).
        val_forget: held-out forget sources (validation losses).
        val_retain: held-out retain sources (validation losses).
        eval_batch_size: validation batch size.
        num_workers: DataLoader workers (same results).
        seed: data-order seed (linked to seed_everything).
        shuffle: shuffle the data order.
        trust_remote_code: allow custom tokenizer code (off by default).
        tokenizer_revision: its hub revision (linked to the model's).
        cache_dir: tokenized-example cache; auto: the machine's (LIT_UNLEARN_CACHE); None: off.
    """

    def __init__(
        self,
        tokenizer: str,
        forget: DataSource | list[DataSource],
        retain: DataSource | list[DataSource],
        max_length: int = 512,
        forget_batch_size: int = 4,
        retain_batch_size: int | None = None,
        val_forget: DataSource | list[DataSource] | None = None,
        val_retain: DataSource | list[DataSource] | None = None,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        trust_remote_code: bool = False,
        tokenizer_revision: str | None = None,
        cache_dir: str | None = "auto",
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"--data.max_length must be >= 2, got {max_length}")
        if forget_batch_size < 1 or (retain_batch_size is not None and retain_batch_size < 1):
            raise ValueError("--data.forget_batch_size and --data.retain_batch_size must be >= 1")
        self.tokenizer_name = tokenizer
        self.forget_sources, self.retain_sources = _as_list(forget), _as_list(retain)
        if not self.forget_sources or not self.retain_sources:
            raise ValueError("--data.forget and --data.retain each need at least one source")
        self.val_forget_sources, self.val_retain_sources = _as_list(val_forget), _as_list(val_retain)
        self.max_length = max_length
        self.forget_batch_size = forget_batch_size
        self.retain_batch_size = retain_batch_size or forget_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.trust_remote_code = trust_remote_code
        self.tokenizer_revision = tokenizer_revision
        self.cache_dir = os.path.join(cache_root(), "data") if cache_dir == "auto" else cache_dir or None
        self.tokenizer: Any = None
        self.forget_examples: Sequence[Example] = []
        self.retain_examples: Sequence[Example] = []
        self.val_examples: dict[str, Sequence[Example]] = {}
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed)
        # set by ``--resume.allow_data_change``: resume even if the data fingerprint differs
        self.allow_data_change = False

    # ------------------------------------------------------------------ building
    def _stream(self, sources: list[DataSource]) -> Iterator[Example]:
        """Every example of ``sources`` in order, one at a time (what the cache is written from)."""
        streams = [src.checked_examples(self.tokenizer, self.max_length) for src in sources]
        firsts = [next(stream) for stream in streams]  # an empty source fails here, naming itself
        with_alternates = [ALTERNATE + "input_ids" in first for first in firsts]
        keep = all(with_alternates)
        if any(with_alternates) and not keep:
            # a group is one table: alternates only where every source has them
            log.warning(
                "%s: only some sources have alternate answers; the group keeps none",
                ", ".join(s.describe() for s in sources),
            )
        for first, rest in zip(firsts, streams):
            for example in itertools.chain([first], rest):
                yield example if keep else {k: v for k, v in example.items() if not k.startswith(ALTERNATE)}

    def _build(self, sources: list[DataSource]) -> list[Example]:
        return list(self._stream(sources))

    @property
    def has_alternates(self) -> bool:
        """Whether every forget example carries an alternate answer (the batch's ``alternate``)."""
        return bool(self.forget_examples) and ALTERNATE + "input_ids" in self.forget_examples[0]

    def _examples(self, sources: list[DataSource]) -> Sequence[Example]:
        if self.cache_dir is None:
            return self._build(sources)
        return cached_examples(
            self.cache_dir, sources, self.tokenizer, self.max_length, lambda: self._stream(sources)
        )

    def _groups(self) -> list[tuple[str, list[DataSource]]]:
        groups = [("forget", self.forget_sources), ("retain", self.retain_sources)]
        return groups + [
            (f"val_{n}", s)
            for n, s in (("forget", self.val_forget_sources), ("retain", self.val_retain_sources))
            if s
        ]

    def _validate_and_load_tokenizer(self) -> None:
        # Read and check every file before the tokenizer (or a synthetic target) loads; files that
        # passed before, unchanged, are not read again (their examples come from the cache).
        for _, sources in self._groups():
            if self.cache_dir is not None and validated(self.cache_dir, sources):
                continue
            for source in sources:
                source.validate()
            if self.cache_dir is not None:
                mark_validated(self.cache_dir, sources)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(
                self.tokenizer_name, self.trust_remote_code, revision=self.tokenizer_revision
            )

    def prepare_data(self) -> None:
        """Build the example cache once (Lightning calls this on one process per node before the
        others read it in ``setup``)."""
        if self.cache_dir is None:
            return
        self._validate_and_load_tokenizer()
        for _, sources in self._groups():
            self._examples(sources)

    def setup(self, stage: str | None = None) -> None:
        if not self.forget_examples:
            self._validate_and_load_tokenizer()
            examples = {name: self._examples(sources) for name, sources in self._groups()}
            self.forget_examples, self.retain_examples = examples.pop("forget"), examples.pop("retain")
            self.val_examples = {name.removeprefix("val_"): found for name, found in examples.items()}
            log.info(
                "data: %d forget and %d retain examples", len(self.forget_examples), len(self.retain_examples)
            )
        if stage in (None, "fit"):
            self._check_one_batch_fits()

    def _check_one_batch_fits(self) -> None:
        """A training step needs one global forget batch (before the model is loaded, not after)."""
        _, world = self._rank_world()
        need = self.forget_batch_size * world
        if len(self.forget_examples) < need:
            where = ", ".join(source.describe() for source in self.forget_sources)
            raise UserError(
                f"--data.forget_batch_size {self.forget_batch_size}: the forget set ({where}) has "
                f"{len(self.forget_examples)} example(s), fewer than one global batch ({self.forget_batch_size} "
                f"per device x {world} process(es) = {need}); lower --data.forget_batch_size or add forget data"
            )

    # ------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def make_sampler(self, rank: int | None = None, world_size: int | None = None) -> PairedBatchSampler:
        """The pairing sampler for ``rank`` of ``world_size`` (default: from the trainer)."""
        default_rank, default_world = self._rank_world()
        return PairedBatchSampler(
            len(self.forget_examples),
            len(self.retain_examples),
            self.forget_batch_size,
            self.retain_batch_size,
            seed=self.seed,
            rank=default_rank if rank is None else rank,
            world_size=default_world if world_size is None else world_size,
            shuffle=self.shuffle,
        )

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> DataLoader:
        self.setup("fit")
        sampler = self.make_sampler(rank, world_size)
        trainer = self.trainer
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
        if self._resume is not None:
            epoch, consumed = self._resume
            sampler.set_epoch(epoch)
            sampler.skip(consumed, epoch=epoch)
            self._resume = None
        dataset = PairedBatches(self.forget_examples, self.retain_examples, self.tokenizer.pad_token_id)
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches of indices
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def forget_batches(self, device: torch.device | str = "cpu") -> Iterator[dict[str, Any]]:
        """The forget set in dataset order, ``eval_batch_size`` examples at a time, on ``device``
        (lazy; for objectives that precompute reference values, e.g. NPO)."""
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(self.forget_examples), self.eval_batch_size):
            batch = pad_examples(self.forget_examples[i : i + self.eval_batch_size], pad)
            yield apply_to_collection(batch, torch.Tensor, lambda t: t.to(device))

    def val_dataloader(self) -> list[DataLoader]:
        self.setup("validate")
        loaders = []
        for name in ("forget", "retain"):
            if name in self.val_examples:
                ds = PaddedExamples(self.val_examples[name], self.tokenizer.pad_token_id)
                loaders.append(
                    DataLoader(
                        ds,
                        batch_size=self.eval_batch_size,
                        collate_fn=ds.collate,
                        num_workers=self.num_workers,
                    )
                )
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        """The held-out splits again, for ``lit-unlearn test``."""
        return self.val_dataloader()

    @property
    def val_names(self) -> list[str]:
        """Names of the validation loaders, in order (``forget``, ``retain``)."""
        pairs = (("forget", self.val_forget_sources), ("retain", self.val_retain_sources))
        return [name for name, sources in pairs if sources]

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {}
        # `processed`, not `completed`: a checkpoint saved in on_train_batch_end has finished the batch
        # but not yet counted it as completed.
        consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            "epoch": trainer.current_epoch,
            "batches_consumed": consumed,
            "seed": self.seed,
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> dict[str, Any]:
        """What the training data are, per group: a hash of the sources' classes and settings,
        each file's size and modification time, and the number of examples built."""
        out: dict[str, Any] = {}
        for name, sources in self._groups()[:2]:  # forget and retain: what the steps consume
            described = [source_identity(source) for source in sources]
            files = {
                os.path.abspath(path): [os.path.getsize(path), os.stat(path).st_mtime_ns]
                for path in data_files(described)
            }
            examples = self.forget_examples if name == "forget" else self.retain_examples
            out[name] = {"settings": settings_hash(described), "files": files, "examples": len(examples)}
        return out

    def _check_fingerprint(self, saved: dict[str, Any]) -> None:
        now = self.fingerprint()
        changes = []
        for name in sorted(saved.keys() | now.keys()):
            old, new = saved.get(name, {}), now.get(name, {})
            if old.get("settings") != new.get("settings"):
                changes.append(f"{name} sources' settings")
            old_files, new_files = old.get("files", {}), new.get("files", {})
            for path in sorted(old_files.keys() | new_files.keys()):
                if path not in new_files:
                    changes.append(f"{path} is no longer used")
                elif path not in old_files:
                    changes.append(f"{path} is new")
                elif old_files[path][0] != new_files[path][0]:
                    changes.append(f"{path} size {old_files[path][0]} -> {new_files[path][0]} bytes")
                elif old_files[path][1] != new_files[path][1]:
                    changes.append(f"{path} modified since the checkpoint")
            if old.get("examples") != new.get("examples") and not changes:
                changes.append(f"{name} examples {old.get('examples')} -> {new.get('examples')}")
        if not changes:
            return
        if self.allow_data_change:
            log.warning("resuming on changed data (--resume.allow_data_change): %s", "; ".join(changes))
            return
        raise UserError(
            f"--ckpt_path: the training data changed since the checkpoint was written ({'; '.join(changes[:3])}"
            f"{'; ...' if len(changes) > 3 else ''}); resume with the data it was trained on, or pass "
            "--resume.allow_data_change true to continue on the new data"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("resuming with data seed %s, checkpoint used %s", self.seed, state_dict["seed"])
        if state_dict.get("fingerprint") is not None:
            self._check_fingerprint(state_dict["fingerprint"])
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))
        # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader is stateful;
        # here the sampler skips the consumed batches itself, so the warning does not apply.
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
        )
