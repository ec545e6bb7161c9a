"""One way to record a metric (:func:`log_at_step`) and a configuration (:func:`describe`).

Training metrics, evaluations and lm-eval results are all indexed by completed optimizer steps
(whatever the accumulation), so train and val curves share one x-axis in TensorBoard. Lightning's
``self.log`` indexes by its own batch counter and only works inside certain hooks, hence this.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch


def log_at_step(trainer: Any, metrics: Mapping[str, Any], step: int) -> None:
    """Send ``metrics`` to every logger at ``step`` and keep them in ``trainer.callback_metrics``
    (for monitors, the progress bar and later callbacks).

    Args:
        trainer: the running Trainer.
        metrics: name -> number or 0-d tensor (tensors are read once here: a host sync, so call it
            on logging steps only).
        step: the x-axis value, normally the number of completed optimizer steps.
    """
    values = {name: float(value) for name, value in metrics.items()}
    if not values:
        return
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})


def describe(value: Any) -> Any:
    """Plain data for a configuration value: numbers and strings as they are, containers
    element-wise, objects as ``{class_path, init_args}`` (the arguments their constructor took and
    kept as attributes), anything else by ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, functools.partial):  # an optimizer/scheduler factory
        target = next((a for a in value.args if isinstance(a, type)), value.func)
        return {"class_path": describe_path(target), "init_args": describe(value.keywords)}
    if inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(value, type):
        return describe_path(value)
    cls = type(value)
    try:
        params = [
            n
            for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return repr(value)
    if all(hasattr(value, n) for n in params):  # an object that keeps its arguments (objectives, rules)
        return {
            "class_path": describe_path(cls),
            "init_args": {n: describe(getattr(value, n)) for n in params},
        }
    return repr(value)


def component_name(described: Any) -> str:
    """The class name in a :func:`describe` d component (or in a results file of an earlier
    version, which recorded ``{"name", "args"}``)."""
    if isinstance(described, dict):
        path = described.get("class_path") or described.get("name") or ""
        return str(path).rsplit(".", 1)[-1]
    return str(described).rsplit(".", 1)[-1]


def rule_name(described: Any) -> str:
    """A synthesizer's name for tables and run names: its class, and for a bridge to an
    aggregator (``TorchJD``) the aggregator's class too (``TorchJD-UPGrad``)."""
    aggregator = component_args(described).get("aggregator")
    name = component_name(described)
    return f"{name}-{component_name(aggregator)}" if aggregator is not None else name


def component_args(described: Any) -> dict[str, Any]:
    """The constructor arguments in a :func:`describe` d component (``{}`` if none)."""
    if not isinstance(described, dict):
        return {}
    return dict(described.get("init_args") or described.get("args") or {})


def describe_path(obj: Any) -> str:
    """``module.QualName`` of a class or function."""
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}".lstrip(".")
