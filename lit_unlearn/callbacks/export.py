"""Export: the unlearned model as an ordinary Hugging Face directory at the end of ``fit``."""

from __future__ import annotations

from typing import Any

import lightning as L

from lit_unlearn.adapters import is_adapted, merged_state_dict
from lit_unlearn.engine.outcome import engine_of, model_of
from lit_unlearn.errors import SaveFailed
from lit_unlearn.models import gathered_state_dict
from lit_unlearn.rundir import MODEL_DIR, run_directory, save_pretrained_atomic


class ExportModel(L.Callback):
    """Saves the unlearned model and its tokenizer with ``save_pretrained`` to
    ``<run dir>/unlearned_model`` when ``fit`` ends (``lit-unlearn fit`` always adds it; turn it
    off with ``--export.enabled false``). The directory loads with
    ``AutoModelForCausalLM.from_pretrained`` and ``lit-unlearn-eval``; a sharded (FSDP2) model is
    gathered first, so the directory is always an ordinary full checkpoint; an adapted (LoRA)
    model writes its adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and, with
    ``merge_on_save``, the merged model in ``unlearned_model/merged/``. It is written to a
    temporary name and renamed, so it is never half-written and never replaces an earlier model.
    A failed save names the ``last.ckpt`` to resume from to try again.

    Args:
        enabled: write the model at the end of fit.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path: str | None = None

    @property
    def state_key(self) -> str:
        return "ExportModel"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = run_directory(trainer)  # collective under DDP: every rank calls it
        model: Any = model_of(pl_module)
        if not self.enabled or not hasattr(model, "save_pretrained"):
            return
        full = gathered_state_dict(model)  # sharded (FSDP2): every rank takes part in the gather
        if not trainer.is_global_zero:
            return
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        try:
            self.path = save_pretrained_atomic(model, tokenizer, run_dir, MODEL_DIR, state_dict=full)
            engine = engine_of(pl_module)
            adapter = engine.network.adapter if engine is not None else None
            if adapter is not None and getattr(adapter, "merge_on_save", False) and is_adapted(model):
                # the base weights with the adapters merged in: a plain checkpoint inside the adapter's folder
                merged = merged_state_dict(model, full)
                save_pretrained_atomic(
                    model.get_base_model(), tokenizer, self.path, "merged", state_dict=merged
                )
        except Exception as err:
            ckpt = (
                getattr(trainer.checkpoint_callback, "last_model_path", "")
                or "no checkpoint (enable RunCheckpoint)"
            )
            raise SaveFailed(
                f"saving the unlearned model to {run_dir} failed ({type(err).__name__}: {err}); the trained "
                f"state is in {ckpt}: fix the cause and run the same command with --ckpt_path {ckpt} to save it"
            ) from err
        print(f"lit-unlearn: unlearned model saved to {self.path}")
