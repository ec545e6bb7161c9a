"""Fixtures of the data tests."""

from __future__ import annotations

import pytest

from lit_unlearn.models import load_tokenizer


@pytest.fixture
def tok(bpe_tokenizer_dir):
    """The byte-level BPE test tokenizer (no pad token: padding falls back to EOS)."""
    return load_tokenizer(bpe_tokenizer_dir)
