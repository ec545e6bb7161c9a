"""``python -m lit_unlearn`` is the ``lit-unlearn`` CLI."""

from lit_unlearn.cli import main

main()
