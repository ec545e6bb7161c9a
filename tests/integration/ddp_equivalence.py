"""Run every synthesizer (and every other forget objective once) on 1 or 2 CPU processes; save the weights.

Used by ``test_ddp.py`` as a subprocess (Lightning's DDP launcher re-executes the command line
for rank 1, so this cannot run inside pytest itself)::

    python tests/integration/ddp_equivalence.py --tokenizer T --forget F --retain R --out DIR --devices 2 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torchjd.aggregation import UPGrad  # noqa: E402

from lit_unlearn.engine.module import UnlearningModule  # noqa: E402
from lit_unlearn.eval import SyntheticProbes, UnlearningEvaluator  # noqa: E402
from lit_unlearn.objectives import CEU, DPO, NPO, UNDIAL, WGA, GradientAscent, SatImp, SimNPO  # noqa: E402
from lit_unlearn.synthesis import GRU, RULES, SAGO, TorchJD  # noqa: E402

# (name, forget objective factory, synthesizer): every rule with gradient ascent, and every other
# forget objective once (sequence means: NPO, SimNPO; reweighted token means: WGA, SatImp; a
# reference distillation: UNDIAL; a self-target: CE-U; a preference over alternates: DPO).
CASES = [(rule.__name__, GradientAscent, rule) for rule in RULES] + [
    ("NPO", lambda: NPO(beta=0.5), SAGO),
    ("SimNPO", lambda: SimNPO(beta=0.5), SAGO),
    ("WGA", WGA, SAGO),
    ("SatImp", lambda: SatImp(beta1=1.0, beta2=1.0), SAGO),
    ("UNDIAL", lambda: UNDIAL(beta=3.0), SAGO),
    ("CEU", CEU, SAGO),
    ("DPO", lambda: DPO(beta=0.5), SAGO),
    ("TorchJD-UPGrad", GradientAscent, lambda retain_weight: TorchJD(UPGrad(), retain_weight=retain_weight)),
]
from tests.engine_helpers import make_dm, make_model, sgd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--tokenizer", "--forget", "--retain", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, objective, rule in CASES:
        forget = objective()
        module = UnlearningModule(
            make_model(args.tokenizer),
            forget,
            synthesizer=rule(retain_weight=0.5) if rule is not GRU else GRU(ema=0.5),
            optimizer=sgd(0.2),
            grad_buffer_dtype="param",
        )
        # computed on rank 0, broadcast: every rank must hold the same history
        evaluator = UnlearningEvaluator([SyntheticProbes(num_people=20)], every_n_steps=1)
        trainer = L.Trainer(
            max_steps=args.steps,
            accelerator="cpu",
            devices=args.devices,
            strategy="ddp" if args.devices > 1 else "auto",
            precision="64-true",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[evaluator],
        )
        trainer.fit(module, make_dm(args.tokenizer, args.forget, args.retain, batch=args.batch))
        with open(
            os.path.join(args.out, f"eval-{name}-{args.devices}-rank{trainer.global_rank}.json"), "w"
        ) as handle:
            json.dump(evaluator.history, handle)
        if trainer.is_global_zero:
            result = {
                "world_size": trainer.world_size,
                "initial": make_model(args.tokenizer).state_dict(),
                "final": module.model.state_dict(),
            }
            torch.save(result, os.path.join(args.out, f"{name}-{args.devices}.pt"))


if __name__ == "__main__":
    main()
