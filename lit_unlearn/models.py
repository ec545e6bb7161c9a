"""Loading causal language models and tokenizers (hub id or local path), and frozen copies.

Safe by default: ``trust_remote_code`` is off unless the caller opts in, and weights load from
safetensors when the checkpoint has them (transformers' default preference).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lit_unlearn.errors import ModelPathError, UserError

log = logging.getLogger(__name__)


def looks_local(name_or_path: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id (``org/name``).

    Local: an existing path; anything starting with ``.``, ``/`` or ``~``; more than one ``/``;
    or ``dir/name`` whose first part is an existing local directory (``runs/unlearned_modl``
    is a typo of a local path, not a hub organisation called ``runs``).
    """
    if os.path.exists(os.path.expanduser(name_or_path)):
        return True
    if (
        name_or_path.startswith((".", "/", "~", "\\"))
        or name_or_path.count("/") > 1
        or os.sep != "/"
        and os.sep in name_or_path
    ):
        return True
    head = name_or_path.split("/", 1)[0]
    return "/" in name_or_path and os.path.isdir(head)


def _check_local(name_or_path: str, what: str, flag: str | None = None) -> None:
    """Fail at once for a local-looking path that does not exist (no hub retries), and for a hub
    id that is neither cached nor reachable."""
    flag = flag or ("--model.network.path" if what == "model" else "--data.tokenizer")
    if looks_local(name_or_path):
        if not os.path.exists(os.path.expanduser(name_or_path)):
            hint = (
                " (build the synthetic target with `lit-unlearn-target`, or pass a hub id)"
                if what == "model"
                else ""
            )
            raise ModelPathError(f"{flag}: local path {name_or_path!r} does not exist{hint}")
        _refuse_run_directory(os.path.expanduser(name_or_path), flag)
        return
    _hub_preflight(name_or_path, flag)


def _refuse_run_directory(path: str, flag: str) -> None:
    """A lit-unlearn run directory is not a model: point at the model folder inside it."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return
    markers = ("unlearned_model", "checkpoints", "results.json", "manifest.json")
    if not any(os.path.exists(os.path.join(path, m)) for m in markers):
        return
    model = os.path.join(path, "unlearned_model")
    hint = (
        f"use {model}"
        if os.path.isdir(model)
        else "its run has not written unlearned_model/ yet (resume it with --ckpt_path <dir>/checkpoints/last.ckpt)"
    )
    raise ModelPathError(f"{flag}: {path!r} is a lit-unlearn run directory, not a model: {hint}")


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """One connection attempt per process (the model, its tokenizer and the early path check all ask)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_preflight(repo_id: str, flag: str) -> None:
    """Without a network, transformers retries the hub for about a minute before failing. Check
    once: a cached model loads offline; an uncached one is a one-line error straight away."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or _hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        os.environ["HF_HUB_OFFLINE"] = "1"  # use the cache, skip the retry loop
        log.warning("the Hugging Face Hub is unreachable; loading %s from the local cache", repo_id)
        return
    raise ModelPathError(
        f"{flag}: {repo_id!r} is not a local path, and the Hugging Face Hub is unreachable with "
        "no cached copy; pass a local directory (or check the network)"
    )


SchemeResolver = Callable[[str], str]
"""Maps a ``scheme://name`` model reference to a local directory (building it if need be)."""
SCHEME_ENTRY_POINTS = "lit_unlearn.model_schemes"
_SCHEMES: dict[str, SchemeResolver] = {}


def register_model_scheme(scheme: str, resolver: SchemeResolver) -> None:
    """Let ``scheme://...`` stand for a model that ``resolver`` provides as a local directory.

    Packages register their schemes on import, or declare them as ``lit_unlearn.model_schemes``
    entry points (``synthetic = "lit_unlearn.benchmarks.synthetic.target:resolve_synthetic"``),
    so this module never imports the benchmarks that use it.
    """
    _SCHEMES[scheme] = resolver


def _scheme(name_or_path: str) -> str | None:
    scheme, sep, _ = name_or_path.partition("://")
    return scheme if sep and scheme.isidentifier() else None


def _resolver(scheme: str) -> SchemeResolver:
    if scheme not in _SCHEMES:
        from importlib.metadata import entry_points

        for entry in entry_points(group=SCHEME_ENTRY_POINTS, name=scheme):
            register_model_scheme(scheme, entry.load())
    if scheme not in _SCHEMES:
        known = sorted({*_SCHEMES, *(e.name for e in entry_points(group=SCHEME_ENTRY_POINTS))})
        raise UserError(
            f"no model provider for {scheme}:// (known: {', '.join(s + '://' for s in known) or 'none'}); "
            "give a hub id or a local directory"
        )
    return _SCHEMES[scheme]


def resolve_model(name_or_path: str) -> str:
    """A hub id or local path unchanged; a ``scheme://name`` reference as its provider's directory."""
    scheme = _scheme(name_or_path)
    return name_or_path if scheme is None else _resolver(scheme)(name_or_path)


def check_model_path(name_or_path: str, flag: str = "--model.network.path.path") -> None:
    """Refuse a local-looking model path that does not exist, an unreachable uncached hub id, or
    an unknown ``scheme://`` (whose provider builds the model later, when it is loaded)."""
    scheme = _scheme(name_or_path)
    if scheme is not None:
        _resolver(scheme)
    else:
        _check_local(name_or_path, "model", flag)


DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


def load_tokenizer(
    name_or_path: str,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    revision: str | None = None,
) -> Any:
    """Load a tokenizer and make sure it can pad.

    A tokenizer without a pad token gets its EOS token as pad (with a warning), which is safe
    because padded positions are masked out of attention and loss.

    Args:
        name_or_path: hub id, local directory, or ``synthetic://default`` / ``synthetic://smoke``
            (built on first use, then cached).
        trust_remote_code: allow custom tokenizer code from the checkpoint (off by default).
        padding_side: ``right`` for training and likelihoods, ``left`` for generation.
        revision: hub revision (commit hash, tag or branch) of a hub id; ``None`` = the default branch.
    """
    from transformers import AutoTokenizer

    name_or_path = resolve_model(name_or_path)
    _check_local(name_or_path, "tokenizer")
    try:
        extra = {"revision": revision} if revision else {}
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise UserError(f"tokenizer {name_or_path!r} could not be loaded: {_first_line(err)}") from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(
                f"tokenizer {name_or_path!r} has neither a pad token nor an EOS token to pad with; add a pad token"
            )
        log.warning(
            "tokenizer %s has no pad token; using its EOS token %r for padding", name_or_path, tok.eos_token
        )
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """Load an ``AutoModelForCausalLM`` from a hub id or a local directory.

    Args:
        name_or_path: hub id (e.g. ``HuggingFaceH4/zephyr-7b-beta``), local directory (a full
            model, or a LoRA adapter saved by ``lit-unlearn fit``: its base model loads with it),
            or ``synthetic://default`` / ``synthetic://smoke`` (built on first use, then cached).
        dtype: weight dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto``.
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``; ``None`` = default.
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        revision: hub revision (commit hash, tag or branch) of a hub id; ``None`` = the default branch.
    """
    from transformers import AutoModelForCausalLM

    name_or_path = resolve_model(name_or_path)
    if dtype not in DTYPES:
        raise UserError(f"--model.network.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_local(name_or_path, "model")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if revision:
        kwargs["revision"] = revision
    try:
        if os.path.isfile(os.path.join(os.path.expanduser(name_or_path), "adapter_config.json")):
            # a saved LoRA adapter: its base model (named in adapter_config.json) plus the adapter
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as err:  # not found / no network / no weights: one line, not transformers' page
        raise UserError(
            f"--model.network.path {name_or_path!r} could not be loaded: {_first_line(err)}"
        ) from err
    return model.train()  # from_pretrained returns eval mode; unlearning trains it


def load_reference_lm(name_or_path: str, like: nn.Module) -> nn.Module:
    """A second causal LM (e.g. a retain model an evaluation compares with) loaded in the dtype and
    on the device of ``like``, the model being evaluated."""
    parameter = next(like.parameters())
    return load_causal_lm(name_or_path, str(parameter.dtype).removeprefix("torch.")).to(parameter.device)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, ``eval()``-mode copy with ``requires_grad=False`` everywhere (the reference π_ref)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def select_trainable(model: nn.Module, pattern: Any, flag: str = "trainable_parameters") -> None:
    """Train only the parameters whose names match ``pattern`` (a compiled regex; ``None`` = all)."""
    if pattern is None:
        return
    for name, param in model.named_parameters():
        param.requires_grad_(bool(pattern.search(name)))
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"{flag} {pattern.pattern!r} matches no parameter name")


def compile_trainable(pattern: str | None) -> re.Pattern[str] | None:
    """Compile ``--model.network.trainable_parameters`` (a one-line error naming the flag if invalid)."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UserError(
            f"--model.network.trainable_parameters {pattern!r} is not a valid regular expression ({err})"
        ) from None


def shard_with_fsdp2(model: nn.Module, mesh: Any) -> None:
    """``fully_shard`` every decoder layer, then the root (parameters become dim-0 sharded
    ``DTensor`` s over ``mesh``; each layer is gathered for its forward and backward only).

    Low-precision (bf16/fp16) weights reduce-scatter their gradients in fp32, so the sum over
    ranks does not lose bits before it reaches the task buffers."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()

    try:
        layers = list(decoder_layers(model))
    except ValueError:
        layers = []
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of common causal LMs (Llama/Mistral/Qwen, GPT-2, GPT-NeoX)."""
    paths = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers")
    for path in (*paths, *(f"base_model.model.{p}" for p in paths)):  # and inside a peft model
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} (looked for model.layers, transformer.h, ...)"
    )


def drop_gathered_parameters(model: nn.Module) -> None:
    """Reshard every FSDP2 unit of ``model``. A gathered unit (the root stays gathered after a
    forward pass without backward) has its full-size parameters registered in place of the
    sharded ones, so ``model.parameters()`` would not return what the optimizer steps.
    Unsharded models: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: nn.Module | None) -> bool:
    """Whether the model's parameters are sharded ``DTensor`` s (FSDP2): its forward passes are
    then collectives, so every rank must run the same ones (evaluation included)."""
    from torch.distributed.tensor import DTensor

    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


def gathered_state_dict(model: nn.Module) -> dict[str, Any] | None:
    """The full, unsharded weights of a sharded model on CPU (a collective: call it on every
    rank; only needed on rank 0), or ``None`` for an unsharded model."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer in backward (non-reentrant, so it composes with FSDP and
    with two backward passes per step, and inputs need no ``requires_grad``)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return
    legacy = getattr(model, "gradient_checkpointing_enable", None)
    if legacy is None:
        raise UserError(
            f"--model.network.activation_checkpointing: {type(model).__name__} does not support activation checkpointing"
        )
    legacy(gradient_checkpointing_kwargs={"use_reentrant": False})
