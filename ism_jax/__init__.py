"""ism_jax: language models with the Intermittent Semi-working Mask (ISM) in JAX/Flax.

    from ism_jax import Transformer, ModelConfig, SegmentType, make_attention_mask
"""

from ism_jax import sharding
from ism_jax.attention import attention
from ism_jax.masks import (
    MASK_KINDS,
    MaskRanges,
    SegmentType,
    make_attention_mask,
    make_attention_ranges,
    validate_segments,
)
from ism_jax.model import ModelConfig, Transformer

__all__ = [
    "MASK_KINDS",
    "MaskRanges",
    "ModelConfig",
    "SegmentType",
    "Transformer",
    "attention",
    "make_attention_mask",
    "make_attention_ranges",
    "sharding",
    "validate_segments",
]
