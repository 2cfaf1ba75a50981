"""LoRA adapters (rank 16) on the released Gemma 4 31B checkpoint.

    python -m train.finetune --config=configs/31b_lora.py \
        --config.workdir=/mnt/runs/my_run --config.data.train=train.jsonl \
        --config.init_checkpoint=/path/to/gemma-4-31b/checkpoint

Batch, length, remat and micro-batches are starting points for a TPU slice
(see `gemma4_jax.training.run_config.release_config`); override any field
on the command line. Not sized for a CPU.
"""

import ml_collections

from gemma4_jax.training import run_config


def get_config() -> ml_collections.ConfigDict:
  return run_config.release_config('31b', lora=True)
