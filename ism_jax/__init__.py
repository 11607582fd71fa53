"""ism_jax: language models with the Intermittent Semi-working Mask (ISM) in JAX/Flax."""

from ism_jax.attention import attention
from ism_jax.masks import (
    MASK_KINDS,
    MaskRanges,
    SegmentType,
    make_attention_mask,
    make_attention_ranges,
    validate_segments,
)

__all__ = [
    "MASK_KINDS",
    "MaskRanges",
    "SegmentType",
    "attention",
    "make_attention_mask",
    "make_attention_ranges",
    "validate_segments",
]
