"""Run the installed ``lit-unlearn`` console script as a user would (a subprocess, the shipped
configs, default callbacks and logger), with a timeout so a deadlock fails fast."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "debug", "tiny.yaml")
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
COMPILED = {**ENV, "LIT_UNLEARN_COMPILE": "1"}
"""ENV with the compiled synthesis kernels users get by default (the test session runs eagerly)."""


def tiny_fit(root: str, *extra: str) -> list[str]:
    """``fit`` arguments for the shipped tiny config writing below ``root``, plus ``extra``."""
    return ["fit", "--config", TINY, *extra, "--trainer.default_root_dir", str(root)]


def command(program: str, *args: str) -> list[str]:
    return [os.path.join(BIN, program), *args]


def run(
    program: str, *args: str, timeout: float = 300, cwd: str = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a console script to completion; a hang past ``timeout`` fails the test (TimeoutExpired)."""
    return subprocess.run(
        command(program, *args), cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout
    )


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` imported as a module (its functions called in-process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"{name}_script", os.path.join(ROOT, "scripts", f"{name}.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluated_through_cli(model: str, metric: str, init_args: str, directory: str) -> tuple[dict, dict]:
    """``lit-unlearn-eval --metrics`` with one metric set (``lit_unlearn.eval.<metric>``, its
    ``init_args`` as a YAML flow mapping body) on a saved model, and the same set computed
    in-process: ``(reported, expected)``."""
    import yaml

    import lit_unlearn.eval as evaluation
    from lit_unlearn.models import load_causal_lm, load_tokenizer

    out = os.path.join(directory, "eval.json")
    spec = f"[{{class_path: lit_unlearn.eval.{metric}, init_args: {{{init_args}}}}}]"
    proc = run("lit-unlearn-eval", "--model", model, "--metrics", spec, "--output", out, "--max_length", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as handle:
        reported = json.load(handle)[metric]
    metric_set = getattr(evaluation, metric)(**yaml.safe_load(f"{{{init_args}}}"))
    tokenizer = load_tokenizer(model)
    metric_set.setup(tokenizer, 64)
    return reported, metric_set.compute(load_causal_lm(model), tokenizer)


def run_dirs(root: str) -> list[str]:
    """The run directories under a ``default_root_dir`` (those holding a config.yaml), oldest first."""
    found = glob.glob(os.path.join(str(root), "**", "config.yaml"), recursive=True)
    return [os.path.dirname(p) for p in sorted(found, key=os.path.getmtime)]


def last_checkpoint(root: str) -> str | None:
    """``checkpoints/last.ckpt`` of the (only) run under ``root``, if written yet."""
    found = glob.glob(os.path.join(str(root), "**", "checkpoints", "last.ckpt"), recursive=True)
    return found[0] if found else None


def results(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "results.json")) as handle:
        return json.load(handle)


def saved_weights(run_dir: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "unlearned_model", "model.safetensors"))


def start_until_checkpoint(
    root: str, *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str | None]:
    """Start ``lit-unlearn`` with ``args`` and return once its first ``last.ckpt`` exists (or it
    ended): ``(the running process, the checkpoint)``."""
    import time

    proc = subprocess.Popen(
        command("lit-unlearn", *args),
        cwd=ROOT,
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while last_checkpoint(root) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, last_checkpoint(root)


def sigterm_after_first_checkpoint(
    root: str, *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> tuple[int, str, str | None]:
    """Start ``lit-unlearn`` with ``args``, send SIGTERM once its first ``last.ckpt`` exists (as a
    cluster's time limit would) and wait; returns ``(exit code, stderr, checkpoint)``."""
    import signal

    proc, _ = start_until_checkpoint(root, *args, timeout=timeout, env=env)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err, last_checkpoint(root)


def assert_same_layer_geometry(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-4) -> None:
    """Two runs' ``geometry.per_layer`` (results.json) agree: same grid, every cell within ``tol``."""
    pa, pb = a["geometry"]["per_layer"], b["geometry"]["per_layer"]
    assert pa is not None and pb is not None
    assert (pa["layers"], pa["types"], pa["steps"]) == (pb["layers"], pb["types"], pb["steps"])
    for key, rows in pa["cells"].items():
        for ra, rb in zip(rows, pb["cells"][key]):
            for va, vb in zip(ra, rb):
                assert (va is None) == (vb is None), key
                assert va is None or abs(va - vb) <= tol, (key, va, vb)


def write_synthetic_tofu(directory: str, corpus: Any, per_split: int = 7) -> str:
    """TOFU files in the published schema from the embedded benchmark's questions (forget people
    for forget10, the others for the remaining splits; perturbed answers are other values of the
    same attribute, the paraphrase is the answer itself)."""
    from lit_unlearn.benchmarks.synthetic.corpus import VALUES

    forget = set(corpus.forget_people)
    os.makedirs(directory, exist_ok=True)

    def items(keep: bool, skip: int) -> list[dict[str, Any]]:
        probes = [p for p in corpus.probes_for("qa") if (p.person in forget) is keep][skip : skip + per_split]
        return [
            {"question": p.prompt, "answer": p.answer, "paraphrased_answer": p.answer,
             "perturbed_answer": [v for v in VALUES[p.attribute] if v != p.answer][:3]}
            for p in probes
        ]  # fmt: skip

    for name, keep, skip in (
        ("forget10", True, 0),
        ("retain", False, 0),
        ("real_authors", False, 20),
        ("world_facts", False, 40),
    ):
        with open(os.path.join(directory, f"{name}_perturbed.json"), "w") as handle:
            json.dump(items(keep, skip), handle)
    return directory


def write_synthetic_muse(directory: str, corpus: Any, per_file: int = 6) -> str:
    """MUSE evaluation files in the published schema from the embedded benchmark: VerbMem = the
    forget people's documents cut after three words, KnowMem = their questions (and the retain
    people's), PrivLeak = the forget documents against the membership holdout (documents with
    other people's values, never trained on)."""
    from lit_unlearn.eval.mia import SyntheticMembership

    forget = set(corpus.forget_people)
    texts = SyntheticMembership(num_people=len(corpus.people)).texts()
    documents = [d.text.split() for d in corpus.person_docs(corpus.forget_people)]

    def qa(keep: bool, skip: int) -> list[dict[str, Any]]:
        probes = [p for p in corpus.probes_for("qa") if (p.person in forget) is keep][skip : skip + per_file]
        return [{"question": p.prompt, "answer": p.answer} for p in probes]

    files = {
        "verbmem_forget": [{"prompt": " ".join(w[:3]), "gt": " ".join(w[3:])} for w in documents[:per_file]],
        "knowmem_forget_qa": qa(True, 0),
        "knowmem_forget_qa_icl": qa(True, per_file)[:2],
        "knowmem_retain_qa": qa(False, 0),
        "knowmem_retain_qa_icl": qa(False, per_file)[:2],
        "privleak_forget": [{"text": t} for t in texts["forget"][: 2 * per_file]],
        "privleak_holdout": [{"text": t} for t in texts["forget_holdout"][: 2 * per_file]],
    }
    os.makedirs(directory, exist_ok=True)
    for name, rows in files.items():
        with open(os.path.join(directory, f"{name}.json"), "w") as handle:
            json.dump(rows, handle)
    return directory


def evaluation_overlay(directory: str, mc_task_dir: str, people: int = 20) -> str:
    """A config overlay whose evaluations exercise every data-parallel metric: the probes, RWKU
    greedy generation (forget/neighbour files from the embedded benchmark's questions), membership
    inference, TOFU and MUSE (files from the same questions and documents), corpus NLL, multiple choice, and lm-eval on the
    local ``synthetic_mc`` task; returns its path."""
    from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus

    corpus = generate_corpus(people)
    tofu = write_synthetic_tofu(os.path.join(directory, "tofu"), corpus)
    muse = write_synthetic_muse(os.path.join(directory, "muse"), corpus)
    forget = set(corpus.forget_people)
    rwku = os.path.join(directory, "rwku")
    os.makedirs(rwku, exist_ok=True)
    for name, keep in (("forget_level1.json", True), ("neighbor_level1.json", False)):
        rows = [
            {"query": p.prompt, "answer": p.answer, "level": "1"}
            for p in corpus.probes_for("qa")
            if (p.person in forget) is keep
        ][:19]
        with open(os.path.join(rwku, name), "w") as handle:
            json.dump(rows, handle)
    path = os.path.join(directory, "evaluation.yaml")
    with open(path, "w") as handle:
        handle.write(
            f"""trainer:
  callbacks:
    - class_path: lit_unlearn.eval.UnlearningEvaluator
      init_args:
        metrics:
          - class_path: lit_unlearn.eval.SyntheticProbes
            init_args: {{num_people: {people}}}
          - class_path: lit_unlearn.eval.SyntheticMembership
            init_args: {{num_people: {people}}}
          - class_path: lit_unlearn.eval.RWKU
            init_args: {{directory: {rwku}, batch_size: 4, max_new_tokens: 5}}
          - class_path: lit_unlearn.eval.TOFU
            init_args: {{directory: {tofu}, batch_size: 3, max_new_tokens: 4}}
          - class_path: lit_unlearn.eval.MUSE
            init_args: {{directory: {muse}, retain_auc: 0.5, verbmem_new_tokens: 6, knowmem_new_tokens: 3, verbmem_batch_size: 4, knowmem_batch_size: 4}}
          - class_path: lit_unlearn.eval.CorpusNLL
            init_args:
              source: {{class_path: lit_unlearn.benchmarks.synthetic.SyntheticKnowledge, init_args: {{part: retain, num_people: {people}}}}}
              name: corpus_nll
              batch_size: 7
          - class_path: lit_unlearn.eval.MultipleChoice
            init_args: {{path: {os.path.join(mc_task_dir, "mc.jsonl")}, name: mc_acc}}
        every_n_steps: 5
        monitor: forget_qa
        target: 0.2
        stop_on_target: false
    - class_path: lit_unlearn.eval.LMEvalCallback
      init_args: {{tasks: [synthetic_mc], include_path: {mc_task_dir}, batch_size: 4}}
"""
        )
    return path


def assert_same_evaluations(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two runs of :func:`evaluation_overlay` (e.g. 1 and 2 processes) report the same RWKU,
    membership and probe values at every evaluation, and the same lm-eval accuracy."""
    keys = {k for h in a["history"] for k in h}
    assert {
        "forget_rougeL",
        "retain_neighbor_rougeL_all",
        "forget_qa",
        "model_utility",
        "forget_truth_ratio",
        "forget_verbmem_rougeL",
        "privleak",
    } <= keys, sorted(keys)
    assert any(k.endswith("_auc") for k in keys), sorted(keys)
    assert any(h["forget_rougeL"] > 0 or h["retain_neighbor_rougeL"] > 0 for h in a["history"])
    assert any(h["forget_verbmem_rougeL"] > 0 for h in a["history"])
    assert [sorted(h) for h in a["history"]] == [sorted(h) for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"]):
        for key in ha:
            assert abs(hb[key] - ha[key]) <= 1e-4 * max(1.0, abs(ha[key])), (key, ha[key], hb[key])
    assert a["lm_eval"]["synthetic_mc"] == b["lm_eval"]["synthetic_mc"]  # accuracy over all 40 questions
    assert a["lm_eval"]["synthetic_mc"]["sample_len"] == 40 and 0 < a["lm_eval"]["synthetic_mc"]["acc"] <= 1
