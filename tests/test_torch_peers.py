"""The PyTorch peers of the benchmarks (benchmarks/torch_peers.py, benchmarks/hf_peer.py) on CPU.

Skipped where torch is not installed (the project's own environment has no torch). The ISM ``mask_mod``
given to FlexAttention must equal the dense oracle ``make_attention_mask`` at every pair, and
FlexAttention's output the dense masked softmax on the oracle mask.
"""

from __future__ import annotations

import numpy as np
import pytest

from ism_jax.masks import make_attention_mask

torch = pytest.importorskip("torch")

from benchmarks import attention as attention_benchmark  # noqa: E402
from benchmarks import torch_peers  # noqa: E402


def test_flex_ism_matches_the_dense_oracle_on_packed_rows_with_padding():
  types, ids = torch_peers.check_layout()
  assert (types == 0).sum() == 60 and ids.max() == 2
  oracle = np.asarray(make_attention_mask(types, ids, "ism"))
  assert torch_peers.check_flex_ism(torch, oracle, types, ids) < 1e-4
  assert attention_benchmark.flex_check().startswith("# flex ism check (cpu")


def test_a_mask_that_differs_from_the_oracle_is_caught():
  types, ids = torch_peers.check_layout()
  oracle = np.array(make_attention_mask(types, ids, "ism"))
  oracle[1, 40, 41] = ~oracle[1, 40, 41]
  with pytest.raises(AssertionError, match="row 1, query 40, key 41"):
    torch_peers.check_flex_ism(torch, oracle, types, ids)


@pytest.mark.parametrize("layout", sorted(attention_benchmark.LAYOUTS))
def test_the_benchmark_layouts_give_the_oracle_mask(layout):
  rng = np.random.default_rng(0)
  new_dialogue_prob = attention_benchmark.LAYOUTS[layout]
  types, ids = attention_benchmark.dialogue_layout(rng, 2, 512, new_dialogue_prob=new_dialogue_prob)
  mine = torch_peers.dense_mask_from_mask_mod(torch, types, ids)
  np.testing.assert_array_equal(mine, np.asarray(make_attention_mask(types, ids, "ism")))
