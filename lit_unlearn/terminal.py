"""What ``lit-unlearn`` prints: our lines, not third-party notices.

:func:`quiet_third_party` drops, by their exact text, the messages of other libraries that say
nothing about the run (a deprecation inside Lightning's own code, an advertisement, "TPU
available: False", a warning about an empty list that our data module causes on purpose), and
transformers' progress bars for loading and writing a few tensors. Every other warning is left as
it is. :func:`once` prints a notice once per process (e.g. a cache reused by several components).
"""

from __future__ import annotations

import logging
import re
import warnings

# (warning text, why it is not the user's concern)
NOISY_WARNINGS = (
    # Lightning 2.6 calls a torch API it deprecated itself; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The data module builds its loaders per rank (use_distributed_sampler=False), so Lightning's
    # size check sees an empty list on purpose.
    r"Total length of `\w+` across ranks is zero",
    # Lightning's own logging interval counts batches per epoch; lit-unlearn logs by optimizer
    # step across epochs (StepLogger), so short epochs lose nothing.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
NOISY_LOG_LINES = (
    r"💡 Tip: For seamless cloud",  # an advertisement for a hosted service
    r"TPU available: False, using: 0 TPU cores$",
    r"GPU available: False, used: False$",  # on a CPU machine; a GPU line is kept
    r"(\[rank: \d+\] )?Seed set to \d+$",  # the seed is in the run's name and manifest.json
    r"^`Trainer.fit` stopped: `max_steps=\d+` reached\.$",  # the summary gives the steps
)
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_SHOWN: set[str] = set()


class _DropLines(logging.Filter):
    """Drops log records whose message matches one of :data:`NOISY_LOG_LINES`."""

    def __init__(self) -> None:
        super().__init__()
        self._patterns = [re.compile(p) for p in NOISY_LOG_LINES]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self._patterns)


def quiet_third_party() -> None:
    """Install the filters (idempotent)."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    drop = _DropLines()
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(drop)
        for handler in logger.handlers:
            if not any(isinstance(f, _DropLines) for f in handler.filters):
                handler.addFilter(drop)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def once(message: str) -> None:
    """Print ``message`` unless this process printed it already."""
    if message not in _SHOWN:
        _SHOWN.add(message)
        print(message, flush=True)
