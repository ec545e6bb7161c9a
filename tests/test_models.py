"""Model/tokenizer loading: hub ids versus local paths, and the frozen reference copy."""

from __future__ import annotations

import pytest
import torch

from lit_unlearn.models import _check_local, frozen_copy, load_causal_lm


def test_hub_ids_pass_and_missing_local_paths_fail_clearly(tmp_path):
    _check_local("HuggingFaceH4/zephyr-7b-beta", "model")  # a hub id, not a missing folder
    _check_local(str(tmp_path), "model")
    for bad in ("./missing", "/no/such/dir", "runs/x/unlearned_model"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            _check_local(bad, "model")


def test_bad_dtype_names_the_flag(smoke_target):
    with pytest.raises(ValueError, match="--model.network.dtype must be one of"):
        load_causal_lm(smoke_target, dtype="float8")


def test_loaded_model_trains_and_reference_is_frozen(smoke_target):
    model = load_causal_lm(smoke_target)
    assert model.training  # from_pretrained returns eval mode; unlearning needs train mode
    ref = frozen_copy(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(model.parameters(), ref.parameters()))
