"""LoRA adapters (rank 16) on the released Gemma 4 E4B checkpoint.

    python -m train.finetune --config=configs/e4b_lora.py \
        --config.workdir=/mnt/runs/my_run --config.data.train=train.jsonl \
        --config.init_checkpoint=/path/to/gemma-4-e4b/checkpoint

Batch, length, remat and micro-batches are starting points for a TPU slice
(see `gemma4_jax.training.run_config.release_config`); override any field
on the command line. Not sized for a CPU.
"""

import ml_collections

from gemma4_jax.training import run_config


def get_config() -> ml_collections.ConfigDict:
  return run_config.release_config('e4b', lora=True)
