"""lit_unlearn."""
