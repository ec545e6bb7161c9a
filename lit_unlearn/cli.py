"""The ``lit-unlearn`` command: a LightningCLI over UnlearningModule and UnlearningDataModule.

Examples::

    lit-unlearn fit --config configs/debug/tiny.yaml
    lit-unlearn fit --config configs/debug/tiny.yaml --model.synthesizer PCGrad
    lit-unlearn fit --config configs/base.yaml --config configs/experiments/wmdp_bio_graddiff_sago.yaml
    lit-unlearn fit --print_config                 # every default, with its docstring via =comments
    python -m lit_unlearn validate --config ...    # the same CLI

Each run directory (TensorBoard's ``version_N``) holds the resolved ``config.yaml``,
``manifest.json`` (versions, world size, batch sizes, seed, git revision), ``results.json``, the
event files (curves, geometry, hparams, trade-off figure) and ``unlearned_model/``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from lit_unlearn.data import UnlearningDataModule
from lit_unlearn.eval.report import TradeoffReport
from lit_unlearn.manifest import RunManifest
from lit_unlearn.module import UnlearningModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "use_distributed_sampler": False,  # UnlearningDataModule shards by rank itself
    "default_root_dir": "runs",
    "log_every_n_steps": 10,
}
REFUSED_TRAINER_FLAGS = {
    "accumulate_grad_batches": (1, "--model.accumulate_grad_batches"),
    "gradient_clip_val": (None, "--model.gradient_clip_val"),
}


class UnlearnCLI(LightningCLI):
    """LightningCLI with the links, checks and run-directory extras of lit_unlearn."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.model", "data.tokenizer", compute_fn=lambda m: m if isinstance(m, str) else None)
        parser.link_arguments("seed_everything", "data.seed", compute_fn=lambda s: s if isinstance(s, int) and not isinstance(s, bool) else 0)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        for flag, (allowed, replacement) in REFUSED_TRAINER_FLAGS.items():
            value = config.get("trainer", {}).get(flag)
            if value not in (allowed, None) and not (flag == "accumulate_grad_batches" and value == 1):
                self.parser.error(
                    f"--trainer.{flag}={value} is refused under manual optimization; use {replacement} instead"
                )

    def before_fit(self) -> None:
        self.trainer.callbacks.append(RunManifest())
        if not any(isinstance(cb, TradeoffReport) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(TradeoffReport())

    def after_fit(self) -> None:
        if self.trainer.is_global_zero and self.trainer.log_dir:
            print(f"lit-unlearn: TensorBoard logs in {self.trainer.log_dir}")


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lit-unlearn``."""
    UnlearnCLI(
        UnlearningModule,
        UnlearningDataModule,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
