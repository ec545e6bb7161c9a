"""Fixtures of the evaluation tests: a byte-level BPE tokenizer that pads with EOS and a tiny
random Llama over its vocabulary (both built once per module)."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from lit_unlearn.benchmarks.synthetic import tiny_llama


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(bpe_tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return tiny_llama(len(tok), hidden=32, intermediate=64, layers=2, heads=2, max_positions=256).eval()
