"""``lit-unlearn-relearn``: does the forgotten knowledge come back after a little fine-tuning?

A relearning attack fine-tunes an unlearned model for a few steps on a small slice of the forget
data (or a related corpus) with the plain next-token loss, and evaluates the forget metrics on the
*rest* — data the attack never saw — along the way. Knowledge that was only suppressed returns
quickly; knowledge that was removed has to be learned again from the slice alone. The recovery
curve goes to ``<out>/results.json`` and TensorBoard (``val/<metric>`` against attack steps)::

    lit-unlearn-relearn --model runs/.../unlearned_model \\
      --data '{class_path: lit_unlearn.benchmarks.synthetic.SyntheticKnowledge, init_args: {part: forget, subset: relearn}}' \\
      --metrics '[{class_path: lit_unlearn.eval.SyntheticProbes, init_args: {forget_subset: held_out}}]' \\
      --steps 30 --eval_every 5

An adapter folder (LoRA) is merged into its base first: the attacker fine-tunes every weight.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lit_unlearn.data.collate import pad_examples
from lit_unlearn.data.sources import DataSource
from lit_unlearn.errors import UserError, function_cli
from lit_unlearn.eval.callbacks import UnlearningEvaluator
from lit_unlearn.eval.metrics import MetricSet
from lit_unlearn.objectives.functional import mean_nll
from lit_unlearn.rundir import write_json_atomic


class RelearnData(L.LightningDataModule):
    """The attack's fine-tuning examples, reshuffled every epoch from ``seed``.

    Args:
        tokenizer: the model's tokenizer.
        source: where the examples come from.
        batch_size: sequences per step.
        max_length: token limit per example.
        seed: shuffling seed.
    """

    def __init__(
        self, tokenizer: Any, source: DataSource, batch_size: int, max_length: int, seed: int
    ) -> None:
        super().__init__()
        self.tokenizer, self.source, self.batch_size = tokenizer, source, batch_size
        self.max_length, self.seed = max_length, seed
        self.examples: list[dict[str, Tensor]] = []

    def setup(self, stage: str) -> None:
        if not self.examples:
            self.examples = self.source.checked_build(self.tokenizer, self.max_length)

    def train_dataloader(self) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            self.examples,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=lambda rows: pad_examples(rows, pad),
        )


class Relearner(L.LightningModule):
    """Fine-tunes every weight with the token-mean next-token loss (AdamW or SGD).

    Args:
        model: the causal LM under attack.
        lr: learning rate.
        optimizer: ``adamw`` (weight decay 0) or ``sgd``.
    """

    def __init__(self, model: nn.Module, lr: float, optimizer: Literal["adamw", "sgd"] = "adamw") -> None:
        super().__init__()
        self.model, self.lr, self.optimizer_name = model, lr, optimizer

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = mean_nll(logits, batch["labels"])
        self.log("relearn/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def relearn(
    model: str,
    data: DataSource,
    metrics: list[MetricSet],
    steps: int = 30,
    lr: float = 1e-3,
    lrs: list[float] | None = None,
    select_on: str | None = None,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    batch_size: int = 8,
    eval_every: int = 5,
    max_length: int = 512,
    seed: int = 0,
    dtype: str = "float32",
    accelerator: str = "auto",
    precision: str = "32-true",
    out: str = "runs/relearn",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Run a relearning attack on a saved model and write its recovery curve.

    A fixed attack (one ``lr``, ``steps``) under-states what an attacker can do to a model whose
    knowledge is only suppressed; a tuned one is fair to every method. With ``lrs`` and
    ``select_on`` the attacker tries each learning rate and picks the learning rate *and* the
    number of steps (any evaluation point) that maximise ``select_on``, a metric measured on
    people it may look at (a validation split); report the tuned attack on *other* people (a test
    split), measured in the same runs (e.g. ``SyntheticProbes`` with ``forget_subset:
    held_out_validation, forget_name: validation`` and another with ``held_out_test``).

    Args:
        model: the unlearned model (a folder ``lit-unlearn fit`` wrote, a LoRA adapter folder, or a
            hub id).
        data: what the attacker fine-tunes on: a small slice of the forget data, e.g.
            ``SyntheticKnowledge`` with ``subset: relearn``, or a ``TextCorpus`` / ``QAPairs`` file.
        metrics: what is measured along the way: the forget metrics on held-out data (e.g.
            ``SyntheticProbes`` with ``forget_subset: held_out``), retain metrics if wanted.
        steps: attack length in optimizer steps (with ``select_on``: the longest attack tried).
        lr: the attacker's learning rate (when ``lrs`` is not given).
        lrs: a grid of learning rates; each is a separate attack from the same unlearned model,
            written to ``<out>/lr<lr>/``.
        select_on: the metric key the attacker maximises to pick the learning rate and the number
            of steps (ties: fewer steps, then the smaller learning rate); ``None`` = report the
            last point of the (single) attack.
        optimizer: ``adamw`` or ``sgd``.
        batch_size: sequences per step.
        eval_every: evaluate every this many steps (and before the first and after the last).
        max_length: token limit per example.
        seed: fixes the order of the attack's examples.
        dtype: weight dtype the model loads in.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        precision: Lightning precision (``32-true``, ``bf16-true``, ``bf16-mixed``).
        out: folder for ``results.json`` and the TensorBoard events (must not hold a result yet).
        trust_remote_code: allow custom modelling code from the hub (off by default).
    """
    from lit_unlearn.models import check_model_path, load_tokenizer

    if steps < 1 or eval_every < 1 or batch_size < 1:
        raise UserError("--steps, --eval_every and --batch_size must be >= 1")
    if not metrics:
        raise UserError("--metrics: give at least one metric set to measure recovery with")
    grid = list(lrs) if lrs else [lr]
    if any(not value > 0 for value in grid):
        raise UserError(f"--lrs / --lr: learning rates must be > 0, got {grid}")
    if len(grid) > 1 and select_on is None:
        raise UserError(
            "--lrs with several learning rates needs --select_on, the metric the attacker tunes on"
        )
    results_path = os.path.join(out, "results.json")
    if os.path.exists(results_path):
        raise UserError(f"--out {out} already holds a relearning result; choose another folder")
    check_model_path(model, flag="--model")
    tokenizer = load_tokenizer(model)
    datamodule = RelearnData(tokenizer, data, batch_size, max_length, seed)
    datamodule.setup("fit")  # bad data fails here, before the model loads
    curves: dict[str, list[dict[str, float]]] = {}
    for value in grid:
        folder = out if len(grid) == 1 else os.path.join(out, f"lr{value:g}")
        curves[f"{value:g}"] = _attack(
            model, datamodule, metrics, steps, value, optimizer, eval_every, max_length, seed, dtype,
            accelerator, precision, folder, trust_remote_code,
        )  # fmt: skip
        if select_on is not None and select_on not in curves[f"{value:g}"][0]:
            keys = sorted(k for k in curves[f"{value:g}"][0] if k != "step")
            raise UserError(
                f"--select_on {select_on!r} is not a measured metric; choose one of {', '.join(keys)}"
            )
    chosen_lr, chosen = _select(curves, select_on)
    first = curves[chosen_lr][0]
    report = {
        "model": model,
        "data": data.describe(),
        "attack": {
            "steps": steps,
            "lrs": grid,
            "optimizer": optimizer,
            "batch_size": batch_size,
            "seed": seed,
            "eval_every": eval_every,
            "select_on": select_on,
        },  # fmt: skip
        "examples": len(datamodule.examples),
        "selected": {"lr": float(chosen_lr), "step": chosen["step"], "point": chosen},
        "curve": curves[chosen_lr],
        "curves": curves,
        "recovery": {k: chosen[k] - first[k] for k in first if k != "step"},
    }
    write_json_atomic(results_path, report)
    print(
        f"lit-unlearn-relearn: attack lr {chosen_lr}, {chosen['step']} steps"
        f"{f' (chosen on {select_on})' if select_on else ''}; recovery curve in {results_path}"
    )
    return report


def _select(curves: dict[str, list[dict[str, float]]], select_on: str | None) -> tuple[str, dict[str, float]]:
    """The attack's operating point: the last point of a single attack, or the point of any
    learning rate that maximises ``select_on`` (ties: fewer steps, then the smaller rate)."""
    if select_on is None:
        (name, curve), *_ = curves.items()
        return name, curve[-1]
    candidates = [(-p[select_on], p["step"], float(name), name, p) for name, c in curves.items() for p in c]
    best = min(candidates, key=lambda c: c[:3])
    return best[3], best[4]


def _attack(
    model: str,
    datamodule: RelearnData,
    metrics: list[MetricSet],
    steps: int,
    lr: float,
    optimizer: Literal["adamw", "sgd"],
    eval_every: int,
    max_length: int,
    seed: int,
    dtype: str,
    accelerator: str,
    precision: str,
    out: str,
    trust_remote_code: bool,
) -> list[dict[str, float]]:
    """One attack from a freshly loaded copy of ``model``; returns its evaluation history."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_unlearn.adapters import is_adapted
    from lit_unlearn.models import load_causal_lm

    net: Any = load_causal_lm(model, dtype, trust_remote_code=trust_remote_code)
    if is_adapted(net):
        net = net.merge_and_unload()
    net.requires_grad_(True)
    L.seed_everything(seed, verbose=False)
    evaluator = UnlearningEvaluator(metrics, every_n_steps=eval_every, max_length=max_length)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        logger=TensorBoardLogger(save_dir=out, name="", version=""),
        callbacks=[evaluator],
        enable_checkpointing=False,
        log_every_n_steps=1,
        enable_model_summary=False,
    )
    trainer.fit(Relearner(net, lr, optimizer), datamodule=datamodule)
    return list(evaluator.history)


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lit-unlearn-relearn``."""
    function_cli("lit-unlearn-relearn", relearn, args)
