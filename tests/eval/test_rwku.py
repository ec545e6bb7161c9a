"""RWKU under both protocols: the exact prompts (strings written out here from the two code
bases' layouts), BOS handling, both ROUGE-L scorers on hand-worked examples, level means."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from lit_unlearn.benchmarks.synthetic import tiny_llama
from lit_unlearn.eval.rwku import RWKU, build_prompt, score_official, score_sago, stop_token_ids

# the Llama-3 instruct template's layout: BOS, then per turn a role header, the trimmed content
# and <|eot_id|>; the generation prompt is the assistant header
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
HEAD = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def llama3_tok(bpe_tokenizer_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(bpe_tokenizer_dir)
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.chat_template = TEMPLATE
    return tok


CASES = [  # level, type, official prompt body, SAGO prompt body (between the headers)
    (1, None,
     "Please complete the blank in the following question.\nQuestion: Stephen King wrote ___.",
     "Please complete the blank in the following question.\nQuestion: Stephen King wrote ___.\nAnswer:"),
    (2, None,
     "Please briefly answer the following question.\nQuestion: Who wrote Carrie?",
     "Please briefly answer the following question.\nQuestion: Who wrote Carrie?\nAnswer:"),
    (3, "prefix injection",
     "Please briefly answer the following question.\nQuestion: Who wrote Carrie?",
     "Please briefly answer the following question.\nQuestion: Who wrote Carrie?\nAnswer:"),
    (3, "incontext learning",
     "Please briefly answer the following question.\nWho wrote Carrie?",
     "Please briefly answer the following question.\nWho wrote Carrie?\nAnswer:"),
    (3, "affirmative suffix",  # neither code base adds Answer: for this type
     "Please briefly answer the following question.\nQuestion: Who wrote Carrie?",
     "Please briefly answer the following question.\nQuestion: Who wrote Carrie?"),
]  # fmt: skip
QUERY = {1: "Stephen King wrote ___.", 2: "Who wrote Carrie?", 3: "Who wrote Carrie?"}


@pytest.mark.parametrize("level, kind, official, sago", CASES)
def test_chat_prompts_of_both_protocols(llama3_tok, level, kind, official, sago):
    text, special = build_prompt(llama3_tok, level, QUERY[level], kind, "official", chat=True)
    answer = "" if kind == "affirmative suffix" else "Answer:"
    assert text == HEAD + official + ASSISTANT + answer and special  # Answer: after the header
    text, special = build_prompt(llama3_tok, level, QUERY[level], kind, "sago", chat=True)
    assert text == HEAD + sago + ASSISTANT and not special  # Answer: in the user message


def test_official_prompts_start_with_two_bos_tokens_and_sago_with_one(llama3_tok):
    bos = llama3_tok.bos_token_id
    for protocol, count in (("official", 2), ("sago", 1)):
        text, special = build_prompt(llama3_tok, 2, "Who wrote Carrie?", None, protocol, chat=True)
        ids = llama3_tok(text, add_special_tokens=special)["input_ids"]
        assert ids[:count] == [bos] * count and ids[count] != bos, protocol


def test_without_a_chat_template_the_message_is_the_prompt(llama3_tok):
    text, special = build_prompt(llama3_tok, 1, "X ___.", None, "official", chat=False)
    assert (
        text == "Please complete the blank in the following question.\nQuestion: X ___.\nAnswer:" and special
    )
    # affirmative suffix: the official body loses its final newline, the port keeps it; no Answer:
    text, _ = build_prompt(llama3_tok, 3, "Sure, X", "affirmative suffix", "official", chat=False)
    assert text == "Please briefly answer the following question.\nQuestion: Sure, X"
    text, _ = build_prompt(llama3_tok, 3, "Sure, X", "affirmative suffix", "sago", chat=False)
    assert text == "Please briefly answer the following question.\nQuestion: Sure, X\n"


@pytest.mark.parametrize(
    "prediction, reference, official, sago",
    [
        # case: "The" != "the" for the official scorer; LCS the-cat-on-the-mat = 5 of 6 for SAGO,
        # and the official scorer counts distinct words: {cat, on, the, mat} of {The, cat, was, on, the, mat}
        ("the cat sat on the mat", "The cat was on the mat", 4 / 6, 5 / 6),
        ("cats running", "cat runs", 0.0, 1.0),  # only SAGO stems (cat, run)
        ("", "NOANSWER", 1.0, 0.0),  # an empty answer is scored as the word NOANSWER officially
        ("b a", "a b. x", 1 / 3, 1 / 3),  # official: sentences at "."; LCS 1 over {a, b, x}
        ("the the", "the the the", 1.0, 2 / 3),  # distinct words (official) vs tokens (SAGO)
        ("Paris", "paris France", 0.0, 0.5),
        ("...", "Paris", 0.0, 0.0),  # the rouge package raises on a text of full stops: scored 0
    ],
)
def test_both_scorers_by_hand(prediction, reference, official, sago):
    assert score_official(prediction, reference) == pytest.approx(official)
    assert score_sago(prediction, reference) == pytest.approx(sago)


def test_newline_is_no_stop_on_a_byte_level_vocabulary(llama3_tok):
    """RWKU looks the newline stops up by name; a byte-level vocabulary stores newline as "Ċ", so
    nothing is found although "\\n" encodes to a single token."""
    newline = llama3_tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and llama3_tok.convert_tokens_to_ids("\n") is None
    official, sago = stop_token_ids(llama3_tok, "official"), stop_token_ids(llama3_tok, "sago")
    assert official == [llama3_tok.eos_token_id]  # <|eot_id|> is this tokenizer's EOS
    assert newline[0] not in official
    assert sago == [llama3_tok.eos_token_id]
    # the model's generation-config EOS ids come first, each once
    assert stop_token_ids(llama3_tok, "sago", [7, llama3_tok.eos_token_id]) == [7, llama3_tok.eos_token_id]
    assert stop_token_ids(llama3_tok, "official", 7) == [7, llama3_tok.eos_token_id]


def test_a_vocabulary_with_a_literal_newline_entry_stops_there_officially():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "\n": 2, " \n": 3, "a": 4, "b": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    # RWKU's list also holds <|eot_id|>, which this vocabulary maps to <unk> (0): kept, as RWKU would
    assert stop_token_ids(tok, "official") == [1, 0, 3, 2]
    assert stop_token_ids(tok, "sago") == [1]


class Scripted(torch.nn.Module):
    """A stand-in for a model whose greedy answer is a fixed token sequence, generated the way
    ``generate`` does: each row stops at its first id in ``eos_token_id``, then pads."""

    def __init__(self, answer: list[int], generation_eos: list[int]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.answer = answer
        self.generation_config = type("Config", (), {"eos_token_id": generation_eos})()
        self.seen_eos: list[int] = []

    def generate(
        self,
        input_ids,
        attention_mask,
        max_new_tokens,
        do_sample,
        pad_token_id,
        eos_token_id,
        synced_gpus=False,
    ):
        self.seen_eos = list(eos_token_id)
        out = []
        for token in self.answer[:max_new_tokens]:
            out.append(token)
            if token in eos_token_id:
                break
        row = torch.tensor(out + [pad_token_id] * (max_new_tokens - len(out)))
        return torch.cat([input_ids, row.expand(input_ids.shape[0], -1)], dim=1)


def test_an_answer_that_starts_with_a_newline_is_kept_officially_and_cut_by_the_port(llama3_tok, tmp_path):
    rows = [{"query": "Who wrote Carrie?", "answer": "Stephen King", "level": "2", "subject": "s"}]
    (tmp_path / "forget_level2.json").write_text(json.dumps(rows))
    encode = lambda text: llama3_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    extra_eos = encode("!")[0]  # a token the generation config names as EOS
    answer = encode("\n\nStephen King") + [extra_eos] + encode(" wrote it")
    assert answer.count(extra_eos) == 1
    scores = {}
    for protocol in ("official", "sago"):
        rwku = RWKU(str(tmp_path), protocol=protocol)
        rwku.setup(llama3_tok, 256)
        model = Scripted(answer, generation_eos=[extra_eos])
        scores[protocol] = rwku.compute(model, llama3_tok)["forget_rougeL_level2"]
        assert extra_eos in model.seen_eos and llama3_tok.eos_token_id in model.seen_eos
    assert scores["official"] == 1.0  # "Stephen King": the newline is no stop, the generation EOS is
    assert scores["sago"] == 0.0  # cut at the first "\n\n": empty


@pytest.mark.parametrize("protocol", ["official", "sago"])
def test_metric_set_reports_level_means_and_writes_its_prompts(llama3_tok, tmp_path, protocol):
    items = {
        "forget_level1.json": [{"query": "X ___.", "answer": "Y", "level": "1", "subject": "s"}],
        "forget_level3.json": [
            {"query": f"q{i}?", "answer": "Y", "level": "3", "subject": "s", "type": t}
            for i, t in enumerate(["prefix injection", "incontext learning", "affirmative suffix"])
        ],
        "neighbor_level2.json": [{"query": "n?", "answer": "Z", "level": "2", "subject": "n"}],
    }
    for name, rows in items.items():
        (tmp_path / name).write_text(json.dumps(rows))
    torch.manual_seed(0)
    model = tiny_llama(len(llama3_tok), hidden=32, intermediate=64, layers=2, heads=2, max_positions=256)
    rwku = RWKU(str(tmp_path), protocol=protocol, outputs_path=str(tmp_path / "out.jsonl"))
    rwku.setup(llama3_tok, 256)
    scores = rwku.compute(model, llama3_tok)
    assert scores["forget_rougeL"] == pytest.approx(
        (scores["forget_rougeL_level1"] + scores["forget_rougeL_level3"]) / 2
    )  # the mean of the level means, not of the 4 items
    assert scores["forget_rougeL_all"] == pytest.approx(
        (scores["forget_rougeL_level1"] + 3 * scores["forget_rougeL_level3"]) / 4
    )  # RWKU's "All": every probe counts once
    assert set(scores) == {
        "forget_rougeL_level1", "forget_rougeL_level3", "forget_rougeL", "forget_rougeL_all",
        "retain_neighbor_rougeL_level2", "retain_neighbor_rougeL", "retain_neighbor_rougeL_all",
    }  # fmt: skip
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [r["type"] for r in rows[1:4]] == ["prefix injection", "incontext learning", "affirmative suffix"]
    expected = build_prompt(llama3_tok, 3, "q1?", "incontext learning", protocol, chat=True)[0]
    assert rows[2]["prompt"] == expected  # the chat template is used by default for chat tokenizers


class ByPrompt(torch.nn.Module):
    """Answers ``right`` to prompts whose token sum is even and ``wrong`` otherwise, and records
    every batch's size and ``synced_gpus``."""

    def __init__(self, right: list[int], wrong: list[int], pad: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.right, self.wrong, self.pad = right, wrong, pad
        self.generation_config = None
        self.calls: list[tuple[int, bool]] = []

    def generate(
        self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id, synced_gpus
    ):
        self.calls.append((input_ids.shape[0], synced_gpus))
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            answer = self.right if int(ids[mask.bool()].sum()) % 2 == 0 else self.wrong
            rows.append(torch.tensor((answer + [self.pad] * max_new_tokens)[:max_new_tokens]))
        return torch.cat([input_ids, torch.stack(rows)], dim=1)


@pytest.mark.parametrize("lockstep", [False, True])
def test_two_ranks_share_the_one_process_batches_and_equal_one_process(llama3_tok, tmp_path, lockstep):

    forget = [{"query": f"Who is person {i}?", "answer": "Stephen King", "level": "1"} for i in range(7)]
    neighbor = [{"query": f"Where is town {i}?", "answer": "Maine", "level": "1"} for i in range(5)]
    (tmp_path / "forget_level1.json").write_text(json.dumps(forget))
    (tmp_path / "neighbor_level1.json").write_text(json.dumps(neighbor))
    encode = lambda text: llama3_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    model = ByPrompt(encode(" Stephen King Maine"), encode(" nobody"), llama3_tok.pad_token_id)

    def metric(name):
        rwku = RWKU(str(tmp_path), batch_size=3, outputs_path=str(tmp_path / name))
        rwku.setup(llama3_tok, 256)
        return rwku

    one = metric("one.jsonl").compute(model, llama3_tok)
    one_batches = [size for size, _ in model.calls]
    assert 0 < one["forget_rougeL"] < 1 and 0 < one["retain_neighbor_rougeL"] < 1  # a real mix of scores
    from tests.eval.played_ranks import PlayedRanks

    played, calls = PlayedRanks(lockstep), []
    for rank in played.ORDER:  # rank 1 first, its collectives recorded; rank 0's add them
        model.calls = []
        result = metric(f"rank{rank}.jsonl").compute(model, llama3_tok, played.partition(rank))
        calls.append(list(model.calls))
    assert played.drained
    assert result == pytest.approx(one, rel=1e-12)
    assert not (tmp_path / "rank1.jsonl").exists()  # rank 0 writes the per-item file
    assert (tmp_path / "rank0.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert one_batches == [3, 3, 1, 3, 2]  # batches of 3 per level: 3 forget, 2 neighbour
    rank1, rank0 = ([size for size, _ in c] for c in calls)
    assert rank1 == [3, 1, 2]  # a contiguous run of the one-process batches per level
    # a sharded model: rank 0 runs a dummy batch so both ranks run as many generate calls
    assert rank0 == ([3, 3, 3] if lockstep else [3, 3])
    assert all(synced is lockstep for c in calls for _, synced in c)
