"""Formats, chunking arithmetic, QA masking, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lit_unlearn.data.sources import (
    IGNORE_INDEX,
    DataSourceError,
    HFDataset,
    QAPairs,
    TextCorpus,
    chunk_token_stream,
    encode_qa,
)
from lit_unlearn.models import load_tokenizer

DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "pathogens and viruses are studied in labs",
    "the capital of france is paris",
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("n", "length", "bos", "expected"),
    [(10, 4, False, [4, 4, 2]), (10, 4, True, [4, 4, 4, 2]), (8, 4, False, [4, 4]), (0, 4, True, [])],
)
def test_chunking_arithmetic(n, length, bos, expected):
    chunks = chunk_token_stream(list(range(n)), length, bos_id=-1 if bos else None)
    assert [len(c) for c in chunks] == expected
    body = [t for c in chunks for t in (c[1:] if bos else c)]
    assert body == list(range(n))  # nothing lost, nothing duplicated
    assert all(c[0] == -1 for c in chunks) if bos else True


def test_text_corpus_jsonl_concatenates_and_chunks_with_loss_everywhere(tok, tmp_path):
    path = write_jsonl(tmp_path / "bio-forget-corpus.jsonl", [{"text": d, "title": "x"} for d in DOCS])
    examples = TextCorpus(path, separator="\n\n").build(tok, max_length=8)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    stream = []
    for i, d in enumerate(DOCS):
        stream += (sep if i else []) + tok(d, add_special_tokens=False)["input_ids"]
    assert len(examples) == -(-len(stream) // 7)
    assert all(ex["input_ids"].numel() <= 8 and ex["input_ids"][0] == tok.bos_token_id for ex in examples)
    assert torch.cat([ex["input_ids"][1:] for ex in examples]).tolist() == stream
    assert all(torch.equal(ex["labels"], ex["input_ids"]) for ex in examples)


def test_json_array_and_txt_formats(tok, tmp_path):
    arr = tmp_path / "docs.json"
    arr.write_text(json.dumps(DOCS))
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(DOCS))
    a = TextCorpus(str(arr), add_bos=False).build(tok, 512)
    b = TextCorpus(str(txt), add_bos=False).build(tok, 512)
    assert len(a) == len(b) == 1
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])  # same separator, same stream


def test_qa_pairs_loss_only_on_answer(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "the capital of france is", "answer": " paris"}])
    (ex,) = QAPairs(path).build(tok, 64)
    prompt_len = 1 + len(tok("the capital of france is", add_special_tokens=False)["input_ids"])
    assert (ex["labels"][:prompt_len] == IGNORE_INDEX).all()
    answer = tok(" paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["labels"][prompt_len:].tolist() == answer


def test_overlong_qa_is_truncated_not_dropped(tok, caplog):
    with caplog.at_level(logging.WARNING):
        ex, cut = encode_qa(" ".join(DOCS * 3), "paris", tok, max_length=10)
    assert cut and ex["input_ids"].numel() == 10
    assert (ex["labels"] != IGNORE_INDEX).sum() > 0


def test_hf_dataset_path_with_local_json_builder(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    via_hf = HFDataset(name="json", data_files=path, split="train").build(tok, 16)
    direct = TextCorpus(path).build(tok, 16)
    assert [e["input_ids"].tolist() for e in via_hf] == [e["input_ids"].tolist() for e in direct]
    with pytest.raises(DataSourceError, match=r"missing column\(s\) \['body'\]"):
        HFDataset(name="json", data_files=path, text_field="body").build(tok, 16)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("", "file is empty"),
        ('{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: malformed JSON line"),
        ('{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2: missing field 'text' \(found \['body'\]\)"),
        ('{"text": 3}\n', r"bad\.jsonl:1: field 'text' must be a string"),
        ('["a"]\n', r"bad\.jsonl:1: expected an object"),
    ],
)
def test_bad_jsonl_inputs_name_file_and_line(tok, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataSourceError, match=message):
        TextCorpus(str(path)).checked_build(tok, 16)


def test_bad_extension_and_zero_chunks(tok, tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(DataSourceError, match="unsupported extension '.csv'"):
        TextCorpus(str(bad)).build(tok, 16)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataSourceError, match="yields zero examples/chunks"):
        TextCorpus(str(blank), separator="").checked_build(tok, 16)


def test_tokenizer_without_pad_uses_eos_with_warning(bpe_tokenizer_dir, caplog):
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(bpe_tokenizer_dir)
    assert tok.pad_token == tok.eos_token == "</s>"
    assert "no pad token" in caplog.text


def test_missing_tokenizer_path_is_clear():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("/nonexistent/tokenizer")


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path):
    """``json.dumps(..., ensure_ascii=False)`` writes U+2028, U+2029 and U+0085 raw; they are text
    inside a record, not line breaks (str.splitlines would cut the record there)."""
    from lit_unlearn.data.sources import read_records

    rows = [{"question": "a\u2028b ?", "answer": "c\u2029d\u0085e"}, {"question": "q ?", "answer": "x"}]
    path = tmp_path / "unicode.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw
    assert read_records(str(path), ["question", "answer"]) == rows


@pytest.mark.parametrize("batch_documents", [1, 2, 7, 256])
@pytest.mark.parametrize("add_bos, separator", [(True, "\n\n"), (False, "\n\n"), (True, "")])
def test_streamed_chunks_are_the_chunks_of_the_whole_stream(tok, batch_documents, add_bos, separator):
    """The streaming chunker (bounded memory) gives exactly the chunks of the concatenated stream."""
    import random

    from lit_unlearn.data.sources import stream_chunks

    rng = random.Random(batch_documents)
    words = " ".join(DOCS).split()
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 40))) for _ in range(50)]
    sep = tok(separator, add_special_tokens=False)["input_ids"] if separator else []
    stream: list[int] = []
    for i, ids in enumerate(tok(texts, add_special_tokens=False)["input_ids"]):
        stream += (sep if i else []) + ids
    bos = tok.bos_token_id if add_bos else None
    expected = chunk_token_stream(stream, 16, bos)
    got = list(stream_chunks(iter(texts), tok, 16, separator, add_bos, batch_documents=batch_documents))
    assert [ex["input_ids"].tolist() for ex in got] == expected
    assert all(torch.equal(ex["input_ids"], ex["labels"]) for ex in got)


def test_a_corpus_streams_without_being_read_whole(tok, tmp_path):
    """The first examples come out while the rest of the corpus is still unread."""
    from lit_unlearn.data.sources import stream_chunks

    def endless():
        i = 0
        while True:
            i += 1
            yield f"document {i} " + "pathogens " * 30

    first = next(stream_chunks(endless(), tok, 32))
    assert first["input_ids"].numel() == 32
    read = []
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 200) + "not json\n")
    corpus = TextCorpus(str(path))
    stream = corpus.examples(tok, 32)
    read.append(next(stream))  # the malformed last line has not been reached yet
    with pytest.raises(DataSourceError, match=r"big\.jsonl:601: malformed JSON line"):
        list(stream)
