"""~250M-parameter ISM model for a Colab TPU v5e-1 (one chip, 16 GB HBM, 197 bf16 TFLOP/s), sequence 2048.

    !python train.py --config configs/tpu_v5e_1.py --workdir /content/runs/v5e

State is 16 bytes/param (~4 GB); activations of 16 x 2048 tokens fit with projection outputs kept
(remat "dots_no_batch"). Attention runs in the Pallas TPU kernel ("auto"). Everything not set here is the
base's: vocabulary 32000, bfloat16 compute (the MXU's native type), AdamW, one chip.
"""

from ism_jax.training.config import base_config


def get_config():
  config = base_config(model="250m")  # 0.25B: 16 layers of width 1024, GQA 16/8 heads of 64, SwiGLU 2816

  config.model.scan_layers = True  # one compiled block scanned over layers
  config.model.remat_policy = "dots_no_batch"  # keep projection outputs, recompute the rest

  config.data.vocab_size = 32000  # tokenizer pieces to train (a small corpus yields fewer)
  config.data.seq_len = 2048  # tokens per packed row
  config.data.num_threads = 4  # reader threads (Colab TPU VMs have few cores per chip)
  config.data.eval_max_dialogues = 1000  # validation dialogues per evaluation

  config.optimizer.learning_rate = 6e-4  # peak learning rate
  config.optimizer.warmup_steps = 500  # linear warmup steps

  # 16 x 2048 = 32k tokens per step.
  config.training.num_steps = 10_000  # optimizer steps (~330M tokens)
  config.training.global_batch_size = 16  # packed rows per step
  config.training.log_every = 20  # metrics record cadence
  config.training.eval_every = 1000  # evaluation cadence
  config.training.checkpoint_every = 500  # checkpoint cadence (Colab sessions end without warning)
  config.training.keep_checkpoints = 2  # newest checkpoints kept (Colab disk is small)
  return config
