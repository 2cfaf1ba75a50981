"""Fine-tuning: the data pipeline (records, packing, batches)."""

from gemma4_jax.training.data import BatchIterator, DataConfig, TrainingDataset, make_dataset
from gemma4_jax.training.records import DataFormatError, read_jsonl
