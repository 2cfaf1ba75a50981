"""Gemma 4 checkpoints: layouts, Orbax loading and saving, variant detection.

Typical use:

  params = checkpoint.load_params(path, config=get_preset('e2b'),
                                  dtype=jnp.bfloat16)
  config = checkpoint.config_from_checkpoint(path)
"""

from gemma4_jax.checkpoint.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    UnknownVariantError,
    UnsupportedCheckpointError,
)
from gemma4_jax.checkpoint.files import CheckpointFiles, resolve_checkpoint
from gemma4_jax.checkpoint.inspect import (
    CheckpointSummary,
    inspect_checkpoint,
    param_group,
    summarize_tree,
)
from gemma4_jax.checkpoint.io import load_params, save_params
from gemma4_jax.checkpoint.layouts import (
    Layout,
    detect_layout,
    flat_to_nested,
    flat_to_stacked,
    from_nested,
    nested_to_flat,
    split_multimodal,
    stacked_to_flat,
    to_nested,
)
from gemma4_jax.checkpoint.shapes import count_params, expected_param_shapes
from gemma4_jax.checkpoint.variants import (
    config_from_checkpoint,
    infer_config_fields,
    validate_shapes,
)
