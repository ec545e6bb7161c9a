"""The embedded fictitious-knowledge benchmark: corpus, tokenizer, target model and probes.

Importing it registers the ``synthetic://`` models (``synthetic://default``, ``synthetic://smoke``)
with :mod:`lit_unlearn.models` (installed packages also find them through the
``lit_unlearn.model_schemes`` entry point).
"""

from lit_unlearn.benchmarks.synthetic.corpus import SyntheticCorpus, build_tokenizer, generate_corpus
from lit_unlearn.benchmarks.synthetic.source import SyntheticKnowledge
from lit_unlearn.benchmarks.synthetic.target import SCHEME, build_target, resolve_synthetic, tiny_llama
from lit_unlearn.models import register_model_scheme

register_model_scheme(SCHEME.removesuffix("://"), resolve_synthetic)

__all__ = [
    "SyntheticCorpus",
    "SyntheticKnowledge",
    "build_target",
    "build_tokenizer",
    "generate_corpus",
    "resolve_synthetic",
    "tiny_llama",
]
