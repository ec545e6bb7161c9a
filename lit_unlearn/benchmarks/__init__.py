"""Benchmarks that ship with lit_unlearn (each a package: its data, target model and probes)."""
