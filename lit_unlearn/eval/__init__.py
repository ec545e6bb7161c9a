"""Evaluation: metric sets, in-training evaluation with the matched-forgetting stop, the
lm-evaluation-harness bridge, RWKU, TOFU, MUSE, membership inference, and run reports (results.json, TensorBoard, comparison)."""

from lit_unlearn.eval.callbacks import UnlearningEvaluator
from lit_unlearn.eval.compare import compare_runs
from lit_unlearn.eval.harness import LMEvalCallback, run_lm_eval
from lit_unlearn.eval.metrics import CorpusNLL, MetricSet, MultipleChoice, SyntheticProbes
from lit_unlearn.eval.mia import MembershipInference, SyntheticMembership
from lit_unlearn.eval.muse import MUSE, SyntheticMUSE
from lit_unlearn.eval.report import TradeoffReport
from lit_unlearn.eval.rwku import RWKU
from lit_unlearn.eval.tofu import TOFU, SyntheticTOFU

__all__ = [
    "MUSE",
    "RWKU",
    "TOFU",
    "CorpusNLL",
    "LMEvalCallback",
    "MembershipInference",
    "MetricSet",
    "MultipleChoice",
    "SyntheticMUSE",
    "SyntheticMembership",
    "SyntheticProbes",
    "SyntheticTOFU",
    "TradeoffReport",
    "UnlearningEvaluator",
    "compare_runs",
    "run_lm_eval",
]
