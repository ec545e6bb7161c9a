"""Evaluation layer: metric values, lm-eval bridge vs an independent computation, RWKU, the
matched-forgetting stop, results.json, TensorBoard read-back and compare_runs."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.eval import MultipleChoice
from lit_unlearn.eval.callbacks import UnlearningEvaluator
from lit_unlearn.eval.harness import _local_task_names, _task_manager, run_lm_eval
from lit_unlearn.eval.metrics import MetricSet, choice_logliks, load_multiple_choice
from lit_unlearn.eval.rwku import greedy_generate
from lit_unlearn.models import load_tokenizer
from tests.conftest import SMOKE_PEOPLE
from tests.engine_helpers import make_dm, make_model, sgd, write_probe_pairs
from tests.integration.cli_helpers import run_dirs

TINY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "debug",
    "tiny.yaml",
)


@pytest.fixture(scope="module")
def target(smoke_target):
    return AutoModelForCausalLM.from_pretrained(smoke_target), load_tokenizer(smoke_target)


def test_choice_logliks_match_a_manual_sum(target):
    model, tok = target
    scores = choice_logliks(model, tok, "Q : where was", [" x", " y y"])
    ids = torch.tensor([tok("Q : where was y y")["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    n = ids.shape[1]
    manual = logp[n - 3, ids[0, n - 2]] + logp[n - 2, ids[0, n - 1]]
    assert scores[1] == pytest.approx(manual.item(), rel=1e-6)


def test_lm_eval_bridge_accuracy_equals_independent_loglik_rule(target, mc_task, monkeypatch):
    model, tok = target
    task_dir, data, rows = mc_task
    import lm_eval.tasks

    seen = {}
    original = lm_eval.tasks.TaskManager.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__", spy)
    _task_manager.cache_clear()  # built once per process: another test may have built it
    results = run_lm_eval(model, tok, ["synthetic_mc"], include_path=task_dir, batch_size=8)
    assert seen["include_defaults"] is False  # only local tasks asked: the bundled index is not scanned
    independent = 0
    for row in rows:
        scores = choice_logliks(model, tok, row["question"], [" " + c for c in row["choices"]])
        independent += int(max(range(4), key=scores.__getitem__) == row["answer"])
    metric = MultipleChoice(data, split="forget", name="mc")
    metric.setup(tok, 64)
    ours = metric.compute(model, tok)["forget_mc"]
    assert results["synthetic_mc"]["acc"] == pytest.approx(independent / len(rows)) == pytest.approx(ours)
    assert results["synthetic_mc"]["acc"] > 0.5  # the smoke target knows these facts; chance is 0.25


def test_local_task_index_and_bad_mc_file(mc_task, tmp_path):
    assert _local_task_names(mc_task[0]) == {"synthetic_mc"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match="must index into the 'choices' list"):
        load_multiple_choice(str(bad))


def test_greedy_generation_is_left_padding_safe(target):
    model, tok = target
    prompts = ["Q : where was", "1 plus 2 equals", "count up from 3 : 3 4"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=5, stop_strings=[], batch_size=3)
    single = [
        greedy_generate(model, tok, [p], max_new_tokens=5, stop_strings=[], batch_size=1)[0] for p in prompts
    ]
    assert batched == single
    assert tok.padding_side == "right"  # restored


class Scripted(MetricSet):
    """Returns a scripted forget value per evaluation (the stop must fire at the right step)."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def compute(self, model, tokenizer):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"forget_score": value, "retain_score": 1.0 - value / 10}


def test_matched_forgetting_stop_fires_at_the_right_step(synthetic_tokenizer_dir, tmp_path):
    pairs = write_probe_pairs(str(tmp_path))
    evaluator = UnlearningEvaluator(
        [Scripted([1.0, 0.8, 0.5, 0.15, 0.1])], every_n_steps=2, monitor="forget_score", target=0.2
    )
    m = UnlearningModule(make_model(synthetic_tokenizer_dir, torch.float32), optimizer=sgd(0.01))
    trainer = L.Trainer(
        max_steps=50,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        callbacks=[evaluator],
    )
    trainer.fit(m, make_dm(synthetic_tokenizer_dir, *pairs))
    assert evaluator.matched_step == 6 and trainer.global_step == 6  # evaluations at 0, 2, 4, 6
    assert [h["step"] for h in evaluator.history] == [0, 2, 4, 6]
    assert evaluator.matched == {"step": 6, "forget_score": 0.15, "retain_score": pytest.approx(0.985)}


def _tiny_run(tmp_path, synthesizer):
    from lit_unlearn.cli import main

    root = tmp_path / synthesizer
    main(
        [
            "fit",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_steps",
            "10",
            "--model.synthesizer",
            synthesizer,
            "--export.enabled",
            "false",
            "--trainer.log_every_n_steps",
            "2",
        ]
    )
    return run_dirs(root)[0]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return [_tiny_run(tmp, s) for s in ("WeightedSum", "SAGO")]


def test_results_json_schema(tiny_runs):
    results = json.load(open(os.path.join(tiny_runs[1], "results.json")))
    for key in (
        "final",
        "best",
        "matched_step",
        "matched",
        "history",
        "steps",
        "wall_seconds",
        "tokens_per_second",
        "peak_memory_bytes",
        "effective_batch",
        "synthesizer",
        "forget_objective",
        "retain_objective",
        "geometry",
    ):
        assert key in results, key
    assert results["synthesizer"] == {
        "class_path": "lit_unlearn.synthesis.gating.SAGO",
        "init_args": {"forget_weight": 1.0, "retain_weight": 1.0},
    }
    assert results["steps"] == 10 and results["effective_batch"] == {"forget": 8, "retain": 8}
    assert [h["step"] for h in results["history"]] == [0, 5, 10]
    assert results["tokens_per_second"] > 0 and results["peak_memory_bytes"] > 0
    assert results["geometry"]["min_update_retain_cosine"] >= -1e-6  # SAGO's guarantee at every logged step


def test_tensorboard_has_curves_geometry_layout_hparams_and_figure(tiny_runs):
    ea = EventAccumulator(tiny_runs[0], size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {
        "val/forget_qa",
        "val/retain_qa",
        "train/forget_loss",
        "train/retain_loss",
        "train/grad_cosine",
        "train/update_retain_cosine",
        "train/conflict_fraction",
    } <= scalars
    assert not any(tag.startswith("hparams/") for tag in scalars)  # no single-point copies of the metrics
    assert len(ea.Scalars("val/forget_qa")) == 3
    assert "tradeoff/forget_vs_retain" in ea.Tags()["images"]
    assert "custom_scalars__config__" in ea.PluginTagToContent("custom_scalars")
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(
        ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    # accuracies and perplexities never share an axis
    assert any(re.fullmatch(charts["retain and general scores"][1], t) for t in ["val/general_arithmetic"])
    assert not any(re.fullmatch(p, "val/general_ppl") for p in charts["retain and general scores"])
    assert re.fullmatch(charts["perplexities and NLLs"][0], "val/general_ppl")
    hp = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp)
    from tensorboard.plugins.hparams import plugin_data_pb2

    experiment = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/experiment"]).experiment
    infos = list(experiment.hparam_infos)
    assert {h.name for h in infos} == {
        "synthesizer",
        "objectives",
        "seed",
        "lr",
        "forget_weight",
        "retain_weight",
    }
    # TensorBoard sorts by (not differs, name) and shows the first five: the columns that tell
    # runs apart are marked, so they lead and are visible
    shown = sorted(infos, key=lambda h: (not h.differs, h.name))[:5]
    assert [h.name for h in shown[:3]] == ["objectives", "seed", "synthesizer"]
    metrics = [m.display_name or m.name.tag for m in experiment.metric_infos]
    assert metrics[:4] == [
        "matched/forget_qa",
        "matched/retain_qa",
        "matched/general_arithmetic",
        "matched/step",
    ]  # the first five are shown: the matched point leads
    # the last values: the curves' last points, named so
    last = {m.display_name: m.name.tag for m in experiment.metric_infos if m.display_name.startswith("last/")}
    assert last["last/retain_qa"] == "val/retain_qa" and len(last) == len(metrics) - 7
    assert all(m.name.tag in scalars for m in experiment.metric_infos)  # every column reads a logged point
    results = json.load(open(os.path.join(tiny_runs[0], "results.json")))
    matched, final = results["matched"], results["final"]
    for key in ("forget_qa", "retain_qa", "general_arithmetic"):
        (point,) = ea.Scalars(f"matched/{key}")
        assert (point.step, point.value) == (matched["step"], pytest.approx(matched[key]))
        last = ea.Scalars(f"val/{key}")[-1]
        assert (last.step, last.value) == (final["step"], pytest.approx(final[key]))
    assert ea.Scalars("matched/step")[0].value == results["matched_step"]


def test_tradeoff_figures_of_scores_share_one_scale():
    from lit_unlearn.eval.report import tradeoff_figure

    narrow = tradeoff_figure([{"step": 0, "f": 0.9, "r": 0.95}, {"step": 10, "f": 0.8, "r": 0.94}], "f", "r")
    wide = tradeoff_figure([{"step": 0, "f": 1.0, "r": 1.0}, {"step": 10, "f": 0.1, "r": 0.3}], "f", "r")
    assert narrow.axes[0].get_ylim() == wide.axes[0].get_ylim() == (-0.02, 1.02)
    assert narrow.axes[0].get_xlim() == wide.axes[0].get_xlim() == (-0.02, 1.02)
    perplexity = tradeoff_figure(
        [{"step": 0, "f": 3.0, "r": 0.9}, {"step": 10, "f": 9.0, "r": 0.8}], "f", "r"
    )
    assert perplexity.axes[0].get_xlim()[1] > 8  # not a score: its own range


def test_lm_eval_on_a_saved_model_and_in_lightning_test(
    target, mc_task, smoke_target, synthetic_tokenizer_dir, tmp_path
):
    from lit_unlearn.benchmarks.synthetic import SyntheticKnowledge
    from lit_unlearn.data import UnlearningDataModule
    from lit_unlearn.eval import LMEvalCallback
    from lit_unlearn.eval.harness import evaluate_saved

    task_dir = mc_task[0]
    saved = evaluate_saved(
        smoke_target, ["synthetic_mc"], include_path=task_dir, output=str(tmp_path / "lm_eval.json")
    )
    assert json.load(open(tmp_path / "lm_eval.json")) == saved
    callback = LMEvalCallback(["synthetic_mc"], include_path=task_dir)
    module = UnlearningModule(smoke_target)
    dm = UnlearningDataModule(
        smoke_target,
        SyntheticKnowledge("forget", num_people=SMOKE_PEOPLE),
        SyntheticKnowledge("retain", num_people=SMOKE_PEOPLE),
        max_length=64,
        val_forget=SyntheticKnowledge("forget", num_people=SMOKE_PEOPLE),
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[callback])
    out = trainer.test(module, dm)
    assert "val/forget_nll" in out[0]
    assert callback.results["synthetic_mc"]["acc"] == pytest.approx(saved["synthetic_mc"]["acc"])
