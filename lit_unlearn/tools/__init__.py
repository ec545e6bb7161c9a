"""Programs of their own beside ``lit-unlearn``: the memory planner (``lit-unlearn-plan``) and the
relearning attack (``lit-unlearn-relearn``)."""
