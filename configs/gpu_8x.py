"""~3B-parameter ISM model on one 8-GPU host (8 x 80 GB), sequence 4096, fully sharded (FSDP over 8).

    python train.py --config configs/gpu_8x.py --workdir runs/gpu_8x --config.data.name=my_chats

Parameters, gradients and AdamW moments (16 bytes/param, ~48 GB) are sharded over the 8 GPUs (ZeRO-3
style: the 'fsdp' mesh axis), so each GPU holds ~6 GB of state; the batch is split over the same axis.
For 2 x 8 GPUs on two nodes, see docs/TRAINING.md (multi-host) and set mesh.data=2. Everything not set
here is the base's: vocabulary 32000, bfloat16 compute, AdamW with weight decay 0.1, the ISM mask.
"""

from ism_jax.training.config import base_config


def get_config():
  config = base_config(model="3b")  # 3.0B: 28 layers of width 3072, GQA 24/8 heads of 128, SwiGLU 8192

  config.model.rope_theta = 500_000.0  # RoPE base for long contexts
  config.model.scan_layers = True  # one compiled block scanned over layers
  config.model.remat_policy = "dots_no_batch"  # keep projection outputs, recompute the rest

  config.data.vocab_size = 32000  # tokenizer pieces to train
  config.data.seq_len = 4096  # tokens per packed row
  config.data.num_threads = 16  # reader threads (tokenization)
  config.data.eval_max_dialogues = 4000  # validation dialogues per evaluation

  config.optimizer.learning_rate = 2e-4  # peak learning rate
  config.optimizer.warmup_steps = 2000  # linear warmup steps

  # 64 x 4096 = 262k tokens per step (8 rows per GPU).
  config.training.num_steps = 50_000  # optimizer steps (~13B tokens)
  config.training.global_batch_size = 64  # packed rows per step, all GPUs together
  config.training.log_every = 20  # metrics record cadence
  config.training.eval_every = 2000  # evaluation cadence
  config.training.checkpoint_every = 1000  # checkpoint cadence

  config.mesh.data = 1  # no pure data parallelism inside the host
  config.mesh.fsdp = -1  # shard parameters and batch over all 8 GPUs
  return config
