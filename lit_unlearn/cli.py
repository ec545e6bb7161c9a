"""The ``lit-unlearn`` command: a LightningCLI over UnlearningModule and UnlearningDataModule.

Examples::

    lit-unlearn fit --config configs/debug/tiny.yaml
    lit-unlearn fit --config configs/debug/tiny.yaml --model.synthesizer PCGrad
    lit-unlearn fit --config configs/debug/tiny.yaml --trainer.devices 2 --trainer.strategy ddp
    lit-unlearn fit --config configs/debug/tiny.yaml --ckpt_path runs/.../checkpoints/last.ckpt   # resume
    lit-unlearn fit --print_config                 # every default, with its docstring via =comments
    python -m lit_unlearn validate --config ...    # the same CLI

Each run directory (TensorBoard's ``version_N``) holds the resolved ``config.yaml``,
``manifest.json`` (versions, world size, batch sizes, precision actually used, seed, git
revision), ``checkpoints/last.ckpt`` (kept current; written on SIGTERM/Ctrl-C), ``results.json``,
the event files and ``unlearned_model/``. A directory that holds a finished run is never reused.

Errors in the input (files, flags, config values, model paths) are one line on stderr with exit
code 2; ``LIT_UNLEARN_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI

import lit_unlearn.benchmarks.synthetic  # noqa: F401 (registers the synthetic:// models)
from lit_unlearn.callbacks import (
    AccumulationCheck,
    AdaptersMovedGuard,
    CollapseGuard,
    NonFiniteGuard,
    StepLogger,
)
from lit_unlearn.callbacks.checkpointing import RunCheckpoint
from lit_unlearn.callbacks.export import ExportModel
from lit_unlearn.callbacks.manifest import RunManifest
from lit_unlearn.callbacks.progress import name_the_run
from lit_unlearn.checkpoint_files import VerifiedCheckpointIO, check_checkpoint
from lit_unlearn.data import UnlearningDataModule
from lit_unlearn.engine.checks import check_learning_rate, check_precision
from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.errors import (
    RunInterrupted,
    UserError,
    debug,
    fail,
    is_rank_zero,
    run_reporting_errors,
    suggest,
)
from lit_unlearn.eval.report import TradeoffReport
from lit_unlearn.rundir import (
    check_run_directory,
    finished_outputs,
    local_run_directory,
    release_claims,
    run_directory,
)
from lit_unlearn.terminal import quiet_third_party

PROGRAM = "lit-unlearn"
TRAINER_DEFAULTS: dict[str, Any] = {
    "use_distributed_sampler": False,  # UnlearningDataModule shards by rank itself
    "default_root_dir": "runs",
    "log_every_n_steps": 10,
    "enable_model_summary": False,  # RunManifest prints one line: the network and its parameter counts
    "logger": {"class_path": "lit_unlearn.RunLogger"},  # run directories named after the run
}
# Trainer flags that do not apply here, left out of the parser (and of --help): what to use instead.
SKIPPED_TRAINER_FLAGS = {
    "accumulate_grad_batches": "is refused under manual optimization; use --model.accumulate_grad_batches",
    "gradient_clip_val": "is refused under manual optimization; use --model.gradient_clip_val",
    "gradient_clip_algorithm": "does not apply: --model.gradient_clip_val clips the update's global L2 norm",
    "barebones": "does not apply: lit-unlearn fit always logs and keeps last.ckpt",
    "limit_predict_batches": "does not apply: lit-unlearn has no predict subcommand",
}
COMPONENTS = {
    "model.synthesizer": "lit_unlearn.synthesis",
    "model.forget_objective": "lit_unlearn.objectives",
    "model.retain_objective": "lit_unlearn.objectives",
}


def _class_name(spec: Any, default: str) -> str:
    path = _get(spec, "class_path") if spec is not None and not isinstance(spec, str) else spec
    return str(path).rsplit(".", 1)[-1] if path else default


# Settings that say where a run writes or how it is launched, not what it computes: left out of
# the configuration digest in the run directory's name (a resumed run keeps its directory anyway).
_NOT_IN_DIGEST = (
    "config",
    "ckpt_path",
    "resume",
    "print_config",
    "trainer.logger",
    "trainer.default_root_dir",
)


def config_digest(config: Any) -> str:
    """8 hex digits naming the resolved configuration: runs that differ in any setting (α, γ, β,
    steps, data, ...) get different run directories. Stable across processes and machines."""
    import hashlib
    import json

    data = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    data = {k: v for k, v in data.items() if k != "subcommand"}
    for dotted in _NOT_IN_DIGEST:
        parent, _, last = dotted.rpartition(".")
        node = _get(data, parent) if parent else data
        if isinstance(node, dict):
            node.pop(last, None)
    text = json.dumps(data, sort_keys=True, default=lambda o: type(o).__name__)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(config: Any) -> tuple[str, str]:
    """``(benchmark, method/lr<lr>_seed<seed>_<digest>)`` for the run directory, from the parsed
    config (the digest: :func:`config_digest`)."""
    forget = _get(config, "data.forget")
    kind = _class_name(forget, "")
    path = _get(forget, "init_args.path") if forget is not None else None
    if kind == "SyntheticKnowledge":
        benchmark = "synthetic"
    elif isinstance(path, str):
        benchmark = os.path.basename(os.path.dirname(os.path.abspath(path))) or "run"
    else:
        benchmark = kind.lower() or "run"
    synthesizer = _class_name(_get(config, "model.synthesizer"), "WeightedSum")
    aggregator = _get(config, "model.synthesizer.init_args.aggregator")
    if aggregator is not None:  # the TorchJD bridge: name the aggregator too (TorchJD-UPGrad)
        synthesizer += "-" + _class_name(aggregator, "")
    method = "{}_{}+{}".format(  # the synthesizer first: TensorBoard's run filter ^sago groups a method
        synthesizer,
        _class_name(_get(config, "model.forget_objective"), "GradientAscent"),
        _class_name(_get(config, "model.retain_objective"), "NLL"),
    )
    lr = _get(config, "model.optimizer.init_args.lr")
    lr_text = f"{lr:g}" if isinstance(lr, (int, float)) else "default"
    seed = _get(config, "seed_everything")
    return benchmark, f"{method}/lr{lr_text}_seed{seed}_{config_digest(config)}"


def fill_run_logger(config: Any, ckpt_path: str | None) -> None:
    """Complete a RunLogger spec: root = default_root_dir, name = benchmark, version = the run,
    or the directory of the checkpoint being resumed."""
    logger = _get(config, "trainer.logger")
    if _class_name(logger, "") != "RunLogger" or not str(_get(logger, "class_path")).startswith(
        "lit_unlearn"
    ):
        return
    args = logger.init_args
    if args.get("version") is not None:
        return
    ckpt_dir = os.path.dirname(os.path.abspath(ckpt_path)) if isinstance(ckpt_path, str) else ""
    run_dir = os.path.dirname(ckpt_dir)
    if (
        os.path.basename(ckpt_dir) == "checkpoints"
        and os.path.exists(os.path.join(run_dir, "config.yaml"))
        and not finished_outputs(run_dir)
    ):  # resuming an unfinished run: continue in its own directory (a finished one gets a new one)
        args.save_dir, args.name, args.version, args.unique = (
            os.path.dirname(run_dir),
            "",
            os.path.basename(run_dir),
            False,
        )
        return
    benchmark, version = run_name(config)
    if args.get("save_dir") in (None, "runs"):
        args.save_dir = _get(config, "trainer.default_root_dir") or "runs"
    if not args.get("name"):
        args.name = benchmark
    args.version = version


def _get(config: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if config is None:
            return None
        config = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
    return config


DESCRIPTION = (
    "lit-unlearn: LLM unlearning as an asymmetric two-task problem. Each step computes the forget and the "
    "retain gradient separately and combines them with a synthesizer (WeightedSum, PCGrad, PCGradGlobal, SAGO, "
    "SAGOPreferRetain). Start with: lit-unlearn fit --config configs/debug/tiny.yaml"
)


class UnlearnCLI(LightningCLI):
    """LightningCLI with the links, checks and run-directory extras of lit_unlearn."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (the module has no ``predict_step``)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        """Lightning's, without the Trainer flags that do not apply (:data:`SKIPPED_TRAINER_FLAGS`)."""
        parser.add_class_arguments(
            self.trainer_class,
            "trainer",
            fail_untyped=False,
            instantiate=False,
            sub_configs=True,
            skip=set(SKIPPED_TRAINER_FLAGS),
        )
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ExportModel, "export")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite_guard")
        parser.add_lightning_class_args(CollapseGuard, "collapse_guard")
        parser.add_argument(
            "--resume.allow_data_change",
            type=bool,
            default=False,
            help="with --ckpt_path: resume on changed training data",
        )
        parser.link_arguments(
            "model.network.init_args.path",
            "data.tokenizer",
            compute_fn=lambda m: m if isinstance(m, str) else None,
        )
        parser.link_arguments("model.network.init_args.revision", "data.tokenizer_revision")
        parser.link_arguments(
            "seed_everything",
            "data.seed",
            compute_fn=lambda s: s if isinstance(s, int) and not isinstance(s, bool) else 0,
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the checkpoint here (for the model's saved hyper-parameters), before
        anything is instantiated: check it first, and read it through the verifying loader, so a
        truncated, corrupted or foreign checkpoint is refused in one line before a model loads."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not isinstance(path, str) or path in ("last", "best", "hpc", "registry"):
            return
        check_checkpoint(path)
        if not os.path.isfile(path):
            return  # a sharded checkpoint directory: its files were checked against their digest
        hparams = dict(
            VerifiedCheckpointIO().load_checkpoint(path, map_location="cpu").get("hyper_parameters") or {}
        )
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """Checks on the parsed config, before anything (data, model) is loaded."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        check_precision(_get(config, "trainer.precision"))
        check_learning_rate(_get(config, "model.optimizer.init_args.lr"))
        max_steps = _get(config, "trainer.max_steps")
        if self.subcommand == "fit" and isinstance(max_steps, int) and max_steps == 0:
            raise UserError(
                "--trainer.max_steps 0 would train nothing and export the untouched model as unlearned; "
                "give a number of optimizer steps > 0 (or -1 with --trainer.max_epochs), or use "
                "lit-unlearn validate / lit-unlearn-eval to evaluate a model"
            )
        fill_run_logger(config, _get(config, "ckpt_path"))  # the checkpoint was checked in _parse_ckpt_path
        if self.subcommand == "fit" and _get(config, "trainer.enable_checkpointing") is False:
            raise UserError(
                "--trainer.enable_checkpointing false is not supported by lit-unlearn fit (last.ckpt is what makes "
                "a run resumable); use --checkpoint.every_n_train_steps 0 to save only at the end and on interruption"
            )

    def before_fit(self) -> None:
        trainer = self.trainer
        configured = _get(self.config.get(self.subcommand, self.config), "trainer.precision")
        if configured is not None and str(trainer.precision) != str(configured):
            raise UserError(
                f"--trainer.precision {configured}: this device would run {trainer.precision} instead; "
                f"ask for {trainer.precision} explicitly"
            )
        config = self.config.get(self.subcommand, {})
        if trainer.global_rank == 0:  # before the process group exists: no collectives here
            check_run_directory(run_directory(trainer), bool(config.get("ckpt_path")))
        if self.datamodule is not None and hasattr(self.datamodule, "allow_data_change"):
            self.datamodule.allow_data_change = bool(_get(config, "resume.allow_data_change"))
        trainer.callbacks.extend([AdaptersMovedGuard(), AccumulationCheck(), StepLogger(), RunManifest()])
        name_the_run(trainer.callbacks)  # the bar shows the run's name instead of v_num
        reports = [cb for cb in trainer.callbacks if isinstance(cb, TradeoffReport)] or [TradeoffReport()]
        # results.json last, after unlearned_model/: a run interrupted while saving its outputs then
        # has neither, so resuming it writes both into its own directory (results.json marks a run
        # as finished)
        trainer.callbacks[:] = [
            cb for cb in trainer.callbacks if not isinstance(cb, TradeoffReport)
        ] + reports

    def after_fit(self) -> None:
        # No collective here: after fit the ranks may already be leaving. Rank 0's logger knows its
        # own directory (the one every rank was given by broadcast during fit).
        trainer = self.trainer
        if trainer.is_global_zero:
            run_dir = local_run_directory(trainer)
            print(
                f"lit-unlearn: results.json and TensorBoard logs in {run_dir} (tensorboard --logdir {run_dir})"
            )


def parse_run_config(files: list[str], flags: Sequence[str] = ()) -> Any:
    """The configuration a ``lit-unlearn fit --config F ... FLAGS`` run would use, parsed (file
    references and defaults resolved) without building anything: for tools that plan a run."""

    class _ParseOnly(UnlearnCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    quiet_third_party()
    args = [item for path in files for item in ("--config", path)] + list(flags)
    try:
        with warnings.catch_warnings():  # "args and sys.argv both given": args is the point here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _ParseOnly(
                UnlearningModule,
                UnlearningDataModule,
                seed_everything_default=0,
                trainer_defaults=TRAINER_DEFAULTS,
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
                args=args,
                run=False,
            )
    except Exception as err:
        from jsonargparse import ArgumentError

        if isinstance(err, ArgumentError):
            raise UserError(f"--config {' '.join(files)}: {_parse_error(err)}") from None
        raise
    return cli.config


def _checkpoint_hint(cli_holder: dict[str, Any]) -> str:
    trainer = getattr(cli_holder.get("cli"), "trainer", None)
    ckpt = next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, RunCheckpoint)), None)
    path = getattr(ckpt, "last_model_path", "")
    return (
        f"; last checkpoint: {path} (resume with --ckpt_path {path})" if path and os.path.exists(path) else ""
    )


def _parse_error(err: BaseException) -> str:
    """One line from a jsonargparse error: an unknown or unimportable class for a component flag
    lists the available classes; an empty or looping component file says so."""
    raw = str(err)
    text = " ".join(raw.split())
    if "arguments are required" in text and "data.forget" in text:
        return (
            "no data given (--data.forget and --data.retain are required); start from a shipped "
            "configuration: --config configs/debug/tiny.yaml (a tiny run, under a minute) or "
            "--config configs/benchmark/synthetic.yaml"
        )
    for flag, why in SKIPPED_TRAINER_FLAGS.items():
        if re.search(rf"--trainer\.{flag}\b|\btrainer\.{flag}\b|'{flag}'", text):
            return f"--trainer.{flag} {why}"
    for key, package in COMPONENTS.items():
        if f'"{key}"' not in text and f"'{key}'" not in text:
            continue
        flag = f"--{key}"
        loop = re.search(r"Config file loop detected: (\S+) ->", raw)
        if loop:  # what jsonargparse says of a component file with no class in it
            return (
                f"{flag}: {loop.group(1)} holds no class (expected e.g. 'class_path: {package}.<Name>' "
                "with optional init_args)"
            )
        names = _available(package)
        missing = re.search(r"Problem with given class_path '([^']+)':\s*(.+?)(?:\n|$)", raw)
        if missing:
            return (
                f"{flag}: cannot import class_path {missing.group(1)!r} ({missing.group(2).strip()}); "
                f"choose one of {', '.join(names)}, or give an importable class path"
            )
        given = text.rsplit(": ", 1)[-1] if ": " in text else "value"
        return (
            f"{flag}: {given!r} is not an available class{suggest(given, names)}; "
            f"choose one of {', '.join(names)}, or give a full class_path"
        )
    return text[:500]


def _available(package: str) -> list[str]:
    import importlib

    module = importlib.import_module(package)
    base = getattr(module, "Synthesizer", None) or module.Objective
    return sorted(
        n
        for n in getattr(module, "__all__", [])
        if isinstance(getattr(module, n), type)
        and issubclass(getattr(module, n), base)
        and getattr(module, n) is not base
    )


def _check_config_files(args: list[str]) -> None:
    """``--config FILE``: the file must hold a mapping of settings (jsonargparse's own message for
    an empty file is "Unexpected config:")."""
    import yaml

    for i, arg in enumerate(args):
        path = (
            args[i + 1]
            if arg == "--config" and i + 1 < len(args)
            else arg.partition("=")[2]
            if arg.startswith("--config=")
            else None
        )
        if not path or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                content = yaml.safe_load(handle)
        except (yaml.YAMLError, UnicodeDecodeError) as yaml_err:
            raise UserError(
                f"--config {path}: not valid YAML ({' '.join(str(yaml_err).split())[:200]})"
            ) from yaml_err
        if content is None:
            raise UserError(
                f"--config {path}: the file is empty; expected a YAML mapping of settings (e.g. 'trainer: ...')"
            )
        if not isinstance(content, dict):
            raise UserError(
                f"--config {path}: expected a YAML mapping of settings, found a {type(content).__name__}"
            )


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lit-unlearn``."""
    holder: dict[str, Any] = {}

    def run() -> None:
        quiet_third_party()
        _check_config_files(list(sys.argv[1:] if args is None else args))
        try:
            holder["cli"] = UnlearnCLI(
                UnlearningModule,
                UnlearningDataModule,
                seed_everything_default=0,
                trainer_defaults=TRAINER_DEFAULTS,
                save_config_kwargs={"overwrite": True},  # check_run_directory guards finished runs first
                auto_configure_optimizers=False,  # the module injects its optimizer: no top-level --optimizer
                parser_kwargs={"exit_on_error": False, "description": DESCRIPTION},
                args=args,
            )
        except RunInterrupted as stop:
            if is_rank_zero():
                print(f"{PROGRAM}: {stop.message}", file=sys.stderr, flush=True)
            raise
        except UserError:
            release_claims()  # refused before training: leave no empty run directory behind
            raise
        except Exception as err:
            from jsonargparse import ArgumentError

            if isinstance(err, ArgumentError) and not debug():
                fail(PROGRAM, _parse_error(err))
            raise

    run_reporting_errors(PROGRAM, run, hint=lambda: _checkpoint_hint(holder))


if __name__ == "__main__":
    main()
