"""Bridge to lm-evaluation-harness: evaluate the live model (or a saved one) on lm-eval tasks.

Built-in hub tasks (``wmdp_bio``, ``wmdp_cyber``, ``mmlu``) need hub access. Local task YAMLs
pointing at local JSON/JSONL files work offline; when every requested task is found in
``include_path``, lm-eval's bundled task index is not scanned at all (``include_defaults=False``),
which saves tens of seconds and any network access.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Any

import lightning as L
from torch import nn

from lit_unlearn.engine.outcome import model_of
from lit_unlearn.errors import UserError, function_cli, suggest
from lit_unlearn.eval.metrics import MetricSet
from lit_unlearn.logs import log_at_step
from lit_unlearn.models import is_sharded
from lit_unlearn.partition import SINGLE, Partition, trainer_partition

FewShot = int | dict[str, int] | None  # one count for every task, or per task; None = task default


def _local_task_names(include_path: str | None) -> set[str]:
    if not include_path:
        return set()
    import yaml

    names: set[str] = set()
    for path in glob.glob(os.path.join(include_path, "**", "*.yaml"), recursive=True):
        with open(path) as handle:
            try:
                spec = yaml.safe_load(handle) or {}
            except yaml.YAMLError:
                continue
        if isinstance(spec, dict) and isinstance(spec.get("task"), str):
            names.add(spec["task"])
    return names


Redirects = tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool, redirects: Redirects = ()) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [include_path] if include_path else []
    if redirects:
        paths.append(_redirected_tasks(include_path, dict(redirects)))
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def _redirected_tasks(include_path: str | None, redirects: dict[str, str]) -> str:
    """A folder of task YAMLs that each ``include`` an indexed task reading one of the redirected
    datasets and override only its ``dataset_path``: indexed after the originals, they replace them
    under the same names (groups, tags, prompts, few-shot splits and metrics stay lm-eval's own)."""
    import atexit
    import shutil
    import tempfile

    import yaml

    index = _task_manager(include_path, True).task_index
    out = tempfile.mkdtemp(prefix="lit_unlearn_lm_eval_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # lm-eval reads them until the process ends
    found: set[str] = set()
    for name, entry in index.items():
        source = (entry.cfg or {}).get("dataset_path")
        if source in redirects and entry.yaml_path is not None and "task" in (entry.cfg or {}):
            found.add(source)
            with open(os.path.join(out, f"{name}.yaml"), "w") as handle:
                yaml.safe_dump({"include": str(entry.yaml_path), "dataset_path": redirects[source]}, handle)
    missing = sorted(set(redirects) - found)
    if missing:
        raise UserError(f"dataset_paths: no lm-eval task reads the dataset(s) {missing}")
    return out


def task_manager(
    tasks: list[str],
    include_path: str | None = None,
    where: str = "--tasks",
    dataset_paths: dict[str, str] | None = None,
) -> Any:
    """lm-eval's task index for ``tasks`` (built once per process), after checking every name.

    When every task is a local YAML under ``include_path`` the bundled index is not scanned
    (fast, offline); otherwise building it takes ~10 s. An unknown name is a one-line
    :class:`UserError` with close matches, raised before any model is loaded. ``dataset_paths``
    maps a hub dataset (``cais/mmlu``) to a local copy in the same layout (a folder
    ``load_dataset`` reads with the same configuration names and splits): the installed task
    definitions then read the copy.
    """
    if not tasks:
        raise UserError(f"{where}: no lm-eval task given")
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"{where}: include_path {include_path!r} is not a directory")
    for source, copy in (dataset_paths or {}).items():
        if not os.path.isdir(copy):
            raise UserError(f"dataset_paths: the local copy of {source!r}, {copy!r}, is not a directory")
    local = _local_task_names(include_path)
    only_local = bool(local) and set(tasks) <= local and not dataset_paths
    redirects = tuple(sorted((k, os.path.abspath(v)) for k, v in (dataset_paths or {}).items()))
    manager = _task_manager(include_path, not only_local, redirects)
    if not only_local:
        known = set(manager.all_tasks)
        for task in tasks:
            if task not in known:
                raise UserError(
                    f"{where}: unknown lm-eval task {task!r}{suggest(task, known)}; "
                    "see `lm-eval ls tasks`, or pass include_path for local task YAMLs"
                )
    return manager


@functools.cache
def _hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class PartitionedHFLM(HFLM):  # type: ignore[misc,valid-type]
        """lm-eval's Hugging Face model on an in-memory network, sharing the documents over the
        processes of a :class:`Partition` (lm-eval assumes one process for a live model)."""

        def use_partition(self, partition: Partition) -> None:
            self._rank, self._world_size = partition.rank, partition.world_size

        def all_gather(self, tensor: Any) -> Any:
            if self.world_size <= 1:
                return tensor
            import torch
            import torch.distributed as dist

            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor.contiguous())
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def barrier(self) -> None:
            if self.world_size > 1:
                import torch.distributed as dist

                dist.barrier()

    return PartitionedHFLM


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: FewShot = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    add_bos_token: bool = False,
    apply_chat_template: bool = False,
    dataset_paths: dict[str, str] | None = None,
    partition: Partition = SINGLE,
) -> dict[str, dict[str, float]]:
    """Run lm-eval on an in-memory model and tokenizer; returns ``{task: {metric: value}}``.

    Under ``partition`` of several processes every process calls this with the same arguments:
    lm-eval gives process ``r`` documents ``r, r + N, ...``, pads every process to the same number of
    requests, and gathers the per-document scores on process 0, which alone returns the results
    (the others return ``{}``). With ``partition.lockstep`` (a sharded model, whose forward passes
    are collectives) lm-eval's logits cache is off, so every process runs as many forward passes.

    Args:
        model: a Hugging Face causal LM (left in its current mode/device; restored afterwards).
        tokenizer: its tokenizer.
        tasks: lm-eval task names (hub or local).
        include_path: folder of local task YAMLs.
        num_fewshot: few-shot examples: one count for every task, or a mapping task -> count
            (the paper: ``{wmdp_bio: 0, wmdp_cyber: 0, mmlu: 5}``); tasks not given, or ``None``,
            use the task's own default.
        limit: evaluate only this many (or this fraction of) documents per task.
        batch_size: lm-eval batch size.
        max_length: context length given to lm-eval (default: the model's).
        add_bos_token: prepend BOS to every context. Off by default: the published WMDP/MMLU
            numbers of Zephyr-7B (lm-eval 0.4.8, whose HF model added no BOS unless the model was
            Gemma) were scored without it; turn it on for models that need it.
        apply_chat_template: wrap each prompt in the tokenizer's chat template (off: the
            protocol scores raw prompts).
        dataset_paths: hub dataset -> local copy for offline evaluation (see :func:`task_manager`).
        partition: the processes sharing the evaluation (default: this one alone).
    """
    import lm_eval

    manager = task_manager(tasks, include_path, dataset_paths=dataset_paths)
    # Group tasks by few-shot count: the paper runs WMDP zero-shot and MMLU 5-shot.
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        shots = num_fewshot.get(task) if isinstance(num_fewshot, dict) else num_fewshot
        groups.setdefault(shots, []).append(task)
    was_training = model.training
    model.eval()
    raw: dict[str, Any] = {}
    try:
        lm = _hflm_class()(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            add_bos_token=add_bos_token,
            device=str(next(model.parameters()).device),
            logits_cache=not partition.lockstep,
        )
        lm.use_partition(partition)
        for shots, names in groups.items():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=shots,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                apply_chat_template=apply_chat_template,
                bootstrap_iters=0,
                verbosity="WARNING",
            )
            raw.update((out or {}).get("results", {}))
    finally:
        model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in raw.items():
        results[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k
        }
    return results


def evaluate_saved(
    model: str,
    tasks: list[str] | None = None,
    include_path: str | None = None,
    num_fewshot: FewShot = None,
    limit: float | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    output: str | None = None,
    add_bos_token: bool = False,
    apply_chat_template: bool = False,
    dataset_paths: dict[str, str] | None = None,
    metrics: list[MetricSet] | None = None,
    max_length: int = 512,
) -> dict[str, dict[str, float]]:
    """Evaluate a saved model (e.g. ``runs/x/unlearned_model``) with lm-eval tasks and/or our
    metric sets (membership inference, RWKU, multiple choice...); prints JSON.

    Console entry point ``lit-unlearn-eval``, e.g.
    ``lit-unlearn-eval --model runs/demo/sago/unlearned_model --tasks '[wmdp_bio, mmlu]' --device cuda``.

    Args:
        model: local directory or hub id of the model (its tokenizer must be saved beside it).
        tasks: lm-eval task names (may be empty when ``metrics`` are given).
        include_path: folder of local task YAMLs.
        num_fewshot: few-shot count for every task, or per task (the paper:
            ``'{wmdp_bio: 0, wmdp_cyber: 0, mmlu: 5}'``); ``None`` = each task's own default.
        limit: documents per task.
        batch_size: lm-eval batch size.
        dtype: weight dtype.
        device: ``cpu`` or ``cuda``.
        output: also write the results to this JSON file.
        add_bos_token: prepend BOS to every context (off: the published WMDP/MMLU protocol).
        apply_chat_template: wrap prompts in the tokenizer's chat template (off: the protocol).
        dataset_paths: hub dataset -> local copy in the same layout, e.g.
            ``'{cais/wmdp: /data/wmdp, cais/mmlu: /data/mmlu}'``: the installed task definitions
            read the copies (offline clusters, pinned snapshots).
        metrics: metric sets to compute too, e.g.
            ``'[{class_path: lit_unlearn.eval.MembershipInference, init_args: {forget: f.json, holdout: h.json}}]'``;
            their numbers appear under the class name.
        max_length: token limit the metric sets use.
    """
    import json

    from lit_unlearn.models import check_model_path, load_causal_lm, load_tokenizer

    check_model_path(model, flag="--model")
    if not tasks and not metrics:
        raise UserError("lit-unlearn-eval: give --tasks (lm-eval) and/or --metrics (metric sets)")
    if tasks:  # bad task names fail here, before the model loads
        task_manager(tasks, include_path, dataset_paths=dataset_paths)
    tokenizer = load_tokenizer(model)
    for metric in metrics or []:
        metric.setup(tokenizer, max_length)  # bad data files fail before the model loads
    lm = load_causal_lm(model, dtype).to(device)
    results: dict[str, dict[str, float]] = {}
    if tasks:
        results = run_lm_eval(
            lm, tokenizer, tasks, include_path, num_fewshot, limit, batch_size,
            add_bos_token=add_bos_token, apply_chat_template=apply_chat_template, dataset_paths=dataset_paths,
        )  # fmt: skip
    for metric in metrics or []:
        results[type(metric).__name__] = metric.compute(lm, tokenizer)
    print(json.dumps(results, indent=2))
    if output:
        with open(output, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lit-unlearn-eval``."""
    function_cli("lit-unlearn-eval", evaluate_saved, args)


class LMEvalCallback(L.Callback):
    """Runs lm-eval tasks on the live model at the end of ``fit`` and/or ``test`` and logs
    ``test/<task>_<metric>``; the results also go into ``results.json``. Under DDP or FSDP every
    process scores its share of the documents (lm-eval's own split, gathered on rank 0).

    Args:
        tasks: task names, e.g. ``[wmdp_bio, mmlu]`` (hub) or local task names.
        include_path: folder of local task YAMLs.
        num_fewshot: few-shot count for every task, or per task (``{wmdp_bio: 0, mmlu: 5}``, as
            the benchmark configs set it); ``None`` = each task's own default.
        limit: documents per task (``None`` = all).
        batch_size: lm-eval batch size.
        on_fit_end: evaluate after training.
        on_test_end: evaluate in ``lit-unlearn test``.
        add_bos_token: prepend BOS to every context (off: the published WMDP/MMLU protocol).
        apply_chat_template: wrap prompts in the tokenizer's chat template (off: the protocol).
        dataset_paths: hub dataset -> local copy in the same layout, e.g.
            ``'{cais/wmdp: /data/wmdp, cais/mmlu: /data/mmlu}'``: the installed task definitions
            read the copies (offline clusters, pinned snapshots).
    """

    def __init__(
        self,
        tasks: list[str],
        include_path: str | None = None,
        num_fewshot: FewShot = None,
        limit: int | float | None = None,
        batch_size: int = 8,
        on_fit_end: bool = True,
        on_test_end: bool = True,
        add_bos_token: bool = False,
        apply_chat_template: bool = False,
        dataset_paths: dict[str, str] | None = None,
    ) -> None:
        if isinstance(num_fewshot, dict) and set(num_fewshot) - set(tasks):
            raise UserError(
                f"LMEvalCallback num_fewshot names {sorted(set(num_fewshot) - set(tasks))}, which are not among "
                f"its tasks {tasks}"
            )
        self.tasks, self.include_path, self.num_fewshot, self.limit = tasks, include_path, num_fewshot, limit
        self.batch_size, self.run_on_fit_end, self.run_on_test_end = batch_size, on_fit_end, on_test_end
        self.add_bos_token, self.apply_chat_template = add_bos_token, apply_chat_template
        self.dataset_paths = dataset_paths
        self.results: dict[str, dict[str, float]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the task names before the model loads (callbacks are set up before the module)."""
        task_manager(
            self.tasks, self.include_path, where="LMEvalCallback tasks", dataset_paths=self.dataset_paths
        )

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every process evaluates its share of the documents; process 0 gathers the scores.
        model: Any = model_of(pl_module)
        partition = trainer_partition(trainer, is_sharded(model))
        self.results = run_lm_eval(
            model, trainer.datamodule.tokenizer, self.tasks, self.include_path, self.num_fewshot, self.limit,
            self.batch_size, add_bos_token=self.add_bos_token, apply_chat_template=self.apply_chat_template,
            dataset_paths=self.dataset_paths, partition=partition,
        )  # fmt: skip
        self.results = trainer.strategy.broadcast(self.results)
        flat = {
            f"test/{task}_{metric}": value
            for task, metrics in self.results.items()
            for metric, value in metrics.items()
        }
        if trainer.is_global_zero:
            log_at_step(trainer, flat, trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_on_fit_end:
            self._run(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_on_test_end:
            self._run(trainer, pl_module)
