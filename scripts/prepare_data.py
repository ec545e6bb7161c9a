"""Download and lay out the WMDP corpora, the RWKU files, the TOFU splits and the MUSE corpora used
by configs/.

    python scripts/prepare_data.py wmdp [--out data/wmdp]    # bio/cyber forget + retain corpora
    python scripts/prepare_data.py rwku [--out data/rwku]    # targets 1-50 / 151-200 + eval levels
    python scripts/prepare_data.py tofu [--out data/tofu]    # every published TOFU split
    python scripts/prepare_data.py muse [--out data/muse]    # MUSE News and Books, every subset

Needs network access to the Hugging Face Hub (and, for the WMDP bio forget corpus, the access the
WMDP authors grant on request). Offline it stops with one clear line. Not run in the tests.

Layout written (JSONL with a ``text`` field, and RWKU's JSON for evaluation):
    data/wmdp/{bio,cyber}-{forget,retain}-corpus.jsonl
    data/rwku/forget_targets_1-50.jsonl, data/rwku/retain_targets_151-200.jsonl
    data/rwku/eval/{forget_level1,forget_level2,forget_level3,neighbor_level1,neighbor_level2}.json
    data/rwku/eval/{mia_forget,mia_retain}.json   (forget targets only; every field kept)
    data/tofu/{forget01,forget05,forget10,retain90,retain95,retain99,holdout01,holdout05,holdout10}.json
    data/tofu/{forget01,forget05,forget10,retain,real_authors,world_facts}_perturbed.json
        (JSON arrays, every field kept: question, answer, paraphrased_answer, perturbed_answer)
    data/muse/{news,books}/raw_{forget,retain1,retain2,holdout}.json          (text: training corpora)
    data/muse/{news,books}/verbmem_forget.json                                 (prompt, gt)
    data/muse/{news,books}/knowmem_{forget,retain}_qa{,_icl}.json              (question, answer)
    data/muse/{news,books}/privleak_{forget,holdout,retain}.json              (text)
        (JSON arrays, every field kept; the hub's older split names retain2_qa / retain2 are
        written under the current names retain_qa / retain)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

WMDP_CORPORA = "cais/wmdp-corpora"
WMDP_BIO_FORGET = "cais/wmdp-bio-forget-corpus"  # gated
RWKU = "jinzhuoran/RWKU"
RWKU_LEVELS = ["forget_level1", "forget_level2", "forget_level3", "neighbor_level1", "neighbor_level2"]
RWKU_MIA = ["mia_forget", "mia_retain"]  # membership-inference texts (``text``, ``subject``)
TOFU = "locuslab/TOFU"
TOFU_TRAIN = [f"{kind}{n}" for kind, ns in (("forget", "01 05 10"), ("retain", "90 95 99"), ("holdout", "01 05 10"))
              for n in ns.split()]  # fmt: skip
TOFU_EVAL = ["forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
             "real_authors_perturbed", "world_facts_perturbed"]  # fmt: skip
TOFU_FIELDS = {"question", "answer"}
TOFU_EVAL_FIELDS = {"question", "answer", "perturbed_answer"}
MUSE = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
MUSE_FILES = [  # (subset, split names: current first, then older revisions', file written, fields)
    *(
        ("raw", [split], f"raw_{split}.json", {"text"})
        for split in ("forget", "retain1", "retain2", "holdout")
    ),
    ("verbmem", ["forget"], "verbmem_forget.json", {"prompt", "gt"}),
    ("knowmem", ["forget_qa"], "knowmem_forget_qa.json", {"question", "answer"}),
    ("knowmem", ["forget_qa_icl"], "knowmem_forget_qa_icl.json", {"question", "answer"}),
    ("knowmem", ["retain_qa", "retain2_qa"], "knowmem_retain_qa.json", {"question", "answer"}),
    ("knowmem", ["retain_qa_icl", "retain2_qa_icl"], "knowmem_retain_qa_icl.json", {"question", "answer"}),
    ("privleak", ["forget"], "privleak_forget.json", {"text"}),
    ("privleak", ["holdout"], "privleak_holdout.json", {"text"}),
    ("privleak", ["retain", "retain2"], "privleak_retain.json", {"text"}),
]


def _load(name: str, config: str | None, split: str = "train") -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, gated, renamed: say which and stop
        sys.exit(
            f"prepare_data: cannot load {name}{'/' + config if config else ''} ({type(err).__name__}: {str(err)[:200]}); "
            "this step needs network access to the Hugging Face Hub (and access to gated datasets)"
        )


def _split_names(name: str, config: str) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception as err:
        sys.exit(
            f"prepare_data: cannot list the splits of {name}/{config} ({type(err).__name__}: {str(err)[:200]}); "
            "this step needs network access to the Hugging Face Hub"
        )


def _write_jsonl(path: str, texts: Iterable[str]) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp, n = path + ".tmp", 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for text in texts:
            if text and text.strip():
                handle.write(json.dumps({"text": text}) + "\n")
                n += 1
    os.replace(tmp, path)  # never leave a half-written corpus behind
    return n


def prepare_wmdp(out: str) -> None:
    jobs = [
        ("bio-forget-corpus", WMDP_BIO_FORGET, None),
        ("bio-retain-corpus", WMDP_CORPORA, "bio-retain-corpus"),
        ("cyber-forget-corpus", WMDP_CORPORA, "cyber-forget-corpus"),
        ("cyber-retain-corpus", WMDP_CORPORA, "cyber-retain-corpus"),
    ]
    for name, repo, config in jobs:
        ds = _load(repo, config)
        n = _write_jsonl(os.path.join(out, f"{name}.jsonl"), ds["text"])
        print(f"{name}: {n} documents")


def prepare_rwku(out: str) -> None:
    targets = _load(RWKU, "forget_target")
    names = [row["target"] for row in targets]
    forget_names, retain_names = set(names[:50]), set(names[150:200])
    passages = _load(RWKU, "train_original_passage")
    rows = list(passages)
    n_f = _write_jsonl(
        os.path.join(out, "forget_targets_1-50.jsonl"),
        (r["text"] for r in rows if r["subject"] in forget_names),
    )
    n_r = _write_jsonl(
        os.path.join(out, "retain_targets_151-200.jsonl"),
        (r["text"] for r in rows if r["subject"] in retain_names),
    )
    print(f"RWKU passages: {n_f} forget, {n_r} retain")
    for level in RWKU_LEVELS + RWKU_MIA:
        ds = _load(RWKU, level, split="test")
        # every field is kept: level-3 probes need their ``type`` to build the adversarial prompts
        items = [dict(r) for r in ds if r.get("subject") in forget_names]
        if not items:
            sys.exit(f"prepare_data: {RWKU}/{level} has no record about targets 1-50 (its layout changed?)")
        path = os.path.join(out, "eval", f"{level}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as handle:
            json.dump(items, handle)
        os.replace(path + ".tmp", path)
        print(f"RWKU {level}: {len(items)} items")


def _write_json(path: str, items: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(items, handle)
    os.replace(path + ".tmp", path)  # never a half-written split


def prepare_tofu(out: str) -> None:
    """Every TOFU split as a local JSON array (what ``QAPairs`` and ``lit_unlearn.eval.TOFU`` read)."""
    for config in TOFU_TRAIN + TOFU_EVAL:
        items = [dict(r) for r in _load(TOFU, config)]
        needed = TOFU_EVAL_FIELDS if config in TOFU_EVAL else TOFU_FIELDS
        if config in ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed"):
            needed = needed | {"paraphrased_answer"}
        missing = sorted(needed - set(items[0])) if items else sorted(needed)
        if missing:
            sys.exit(f"prepare_data: {TOFU}/{config} has no {missing} (its layout changed?)")
        _write_json(os.path.join(out, f"{config}.json"), items)
        print(f"TOFU {config}: {len(items)} items")


def prepare_muse(out: str) -> None:
    """MUSE News and Books: every subset the evaluation and the training read, as JSON arrays."""
    for corpus, repo in MUSE.items():
        available: dict[str, list[str]] = {}
        for subset, candidates, filename, needed in MUSE_FILES:
            if subset not in available:
                available[subset] = _split_names(repo, subset)
            split = next((c for c in candidates if c in available[subset]), None)
            if split is None:
                sys.exit(
                    f"prepare_data: {repo}/{subset} has no split {' or '.join(candidates)} (its layout changed?)"
                )
            items = [dict(r) for r in _load(repo, subset, split=split)]
            missing = sorted(needed - set(items[0])) if items else sorted(needed)
            if missing:
                sys.exit(f"prepare_data: {repo}/{subset}/{split} has no {missing} (its layout changed?)")
            _write_json(os.path.join(out, corpus, filename), items)
            print(f"MUSE {corpus} {subset}/{split}: {len(items)} records")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=["wmdp", "rwku", "tofu", "muse"])
    parser.add_argument("--out", default=None, help="output folder (default data/<dataset>)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join("data", args.dataset)
    jobs = {"wmdp": prepare_wmdp, "rwku": prepare_rwku, "tofu": prepare_tofu, "muse": prepare_muse}
    jobs[args.dataset](out)


if __name__ == "__main__":
    main()
