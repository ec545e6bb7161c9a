"""A new synthesis rule is one method (tests/test_extension.py runs it through ``lit-unlearn fit``)."""

import torch

from lit_unlearn.synthesis import Synthesizer


class CappedConflict(Synthesizer):
    """``u = α g_r + γ g_f``, except that where the two conflict the forget term may at most cancel
    the retain term: ``γ g_f`` is clamped to ``±α|g_r|`` there. Guarantee: ``u_i g_r,i ≥ 0``."""

    granularity = "element"
    retain_guarantee = "element"

    def combine(self, forget, retain, stats=None):
        step_f, step_r = self.forget_weight * forget, self.retain_weight * retain
        conflict = torch.sign(forget) * retain < 0
        return step_r + torch.where(conflict, step_f.clamp(-step_r.abs(), step_r.abs()), step_f)
