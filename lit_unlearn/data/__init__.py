"""Forget/retain data: sources (formats), pairing and the DataModule (the synthetic benchmark lives in lit_unlearn.benchmarks.synthetic)."""

from lit_unlearn.data.datamodule import UnlearningDataModule
from lit_unlearn.data.sampling import PairedBatchSampler
from lit_unlearn.data.sources import DataSource, DataSourceError, HFDataset, QAPairs, TextCorpus

__all__ = [
    "DataSource",
    "DataSourceError",
    "HFDataset",
    "PairedBatchSampler",
    "QAPairs",
    "TextCorpus",
    "UnlearningDataModule",
]
