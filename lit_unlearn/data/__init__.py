"""Forget/retain data: sources (formats), pairing, the DataModule and the synthetic benchmark."""

from lit_unlearn.data.datamodule import UnlearningDataModule
from lit_unlearn.data.sampling import PairedBatchSampler
from lit_unlearn.data.sources import DataSource, DataSourceError, HFDataset, QAPairs, TextCorpus
from lit_unlearn.data.synthetic import SyntheticKnowledge, build_tokenizer, generate_corpus

__all__ = [
    "DataSource",
    "DataSourceError",
    "HFDataset",
    "PairedBatchSampler",
    "QAPairs",
    "SyntheticKnowledge",
    "TextCorpus",
    "UnlearningDataModule",
    "build_tokenizer",
    "generate_corpus",
]
