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


def test_the_hf_peer_computes_the_project_loss_under_the_ism_mask(tmp_path):
  """The peer's LlamaForCausalLM given this model's weights (through ism_jax.convert), its labels and the
  dense form of its ISM mask_mod gives the loss of ``ism_jax.training.train_step.token_losses``."""
  transformers = pytest.importorskip("transformers")
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

  from benchmarks import hf_peer  # pylint: disable=import-outside-toplevel
  from ism_jax import ModelConfig, Transformer  # pylint: disable=import-outside-toplevel
  from ism_jax.convert import save_hf_model  # pylint: disable=import-outside-toplevel
  from ism_jax.training import train_step as ts  # pylint: disable=import-outside-toplevel
  from tests.test_training import _answer_loss_batch  # pylint: disable=import-outside-toplevel

  config = ModelConfig.tiny(vocab_size=96, rope_theta=500_000.0, init_std=0.3)  # attention matters
  model = Transformer(config, rngs=nnx.Rngs(3))
  files = save_hf_model(model, str(tmp_path))
  batch = _answer_loss_batch(8, rows=3, length=40)
  graphdef, state = nnx.split(model)
  nll, _ = ts.token_losses(graphdef, nnx.to_pure_dict(state), {k: jnp.asarray(v) for k, v in batch.items()})
  expected = float(jnp.sum(nll * batch["loss_mask"]) / batch["loss_mask"].sum())

  peer = transformers.LlamaForCausalLM(hf_peer.llama_config(transformers, config, 40, "sdpa"))
  state_dict = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}
  peer.load_state_dict(state_dict, strict=True)
  masks = hf_peer.IsmMasks(torch, [batch], "cpu")
  inputs = hf_peer.device_batches(torch, [batch], "cpu")[0]
  with torch.no_grad():
    value = float(hf_peer.loss(torch, peer, inputs, masks.select(0), autocast=False))
    causal = float(hf_peer.loss(torch, peer, inputs, None, autocast=False))  # transformers' own causal mask
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert abs(causal - expected) > 1e-3 * expected
