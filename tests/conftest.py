"""Shared fixtures: deterministic seeding, one CPU thread, tiny models and tokenizers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' machine cache (synthetic targets, example caches) stays inside the checkout, out of
# the user's home; the subprocesses the tests start inherit it.
os.environ.setdefault(
    "LIT_UNLEARN_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "lit_unlearn"),
)
# Synthesis runs eagerly in the tests (compiling every tiny model's kernels would cost seconds per
# test); tests/synthesis/test_compiled.py and the compiled CLI run switch it back on.
os.environ.setdefault("LIT_UNLEARN_COMPILE", "0")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


SMOKE_PEOPLE = 20
SMOKE_STEPS = 150


@pytest.fixture(scope="session")
def smoke_target(tmp_path_factory) -> str:
    """The smoke-scale synthetic target (20 people, 150 steps, ~5 s), built once per session."""
    from lit_unlearn.benchmarks.synthetic.target import build_target

    out = tmp_path_factory.mktemp("target") / "smoke"
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    build_target(str(out), num_people=SMOKE_PEOPLE, steps=SMOKE_STEPS, progress=False)
    torch.set_num_threads(threads)
    return str(out)


@pytest.fixture(scope="session")
def synthetic_tokenizer_dir(tmp_path_factory) -> str:
    """The word-level tokenizer of the 20-person corpus, saved offline."""
    from lit_unlearn.benchmarks.synthetic.corpus import build_tokenizer, generate_corpus

    out = tmp_path_factory.mktemp("tok") / "synthetic"
    build_tokenizer(generate_corpus(SMOKE_PEOPLE)).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer trained on the fly, with BOS/EOS but *no pad token*."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = [
        "the quick brown fox jumps over the lazy dog",
        "pathogens and viruses are studied in labs",
        "the capital of france is paris",
        "question answer pairs for unlearning",
    ] * 20
    core.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("tok") / "bpe"
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Forget/retain QA files of the smoke people (one short answer each)."""
    from tests.engine_helpers import write_probe_pairs

    return write_probe_pairs(str(tmp_path_factory.mktemp("pairs")))


@pytest.fixture(scope="module")
def varlen(tmp_path_factory):
    """Forget/retain QA files with answers of 1 to 18 words (variable-length batches)."""
    from tests.engine_helpers import write_varlen_pairs

    return write_varlen_pairs(str(tmp_path_factory.mktemp("varlen")))


@pytest.fixture(scope="session")
def mc_task(tmp_path_factory):
    """A local multiple-choice task in WMDP's schema (question, choices, answer) + its lm-eval YAML."""
    import json
    import random

    from lit_unlearn.benchmarks.synthetic.corpus import VALUES, generate_corpus

    corpus = generate_corpus(SMOKE_PEOPLE)
    rng = random.Random(0)
    rows = []
    for probe in corpus.probes_for("qa")[:40]:
        distractors = rng.sample([v for v in VALUES[probe.attribute] if v != probe.answer], 3)
        choices = distractors[:]
        answer = rng.randrange(4)
        choices.insert(answer, probe.answer)
        rows.append({"question": probe.prompt, "choices": choices, "answer": answer})
    d = tmp_path_factory.mktemp("mc")
    data = d / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "synthetic_mc.yaml").write_text(
        "task: synthetic_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(d), str(data), rows
