"""~250M-parameter ISM model for a Colab TPU v5e-1 (one chip, 16 GB HBM, 197 bf16 TFLOP/s), sequence 2048.

    !python train.py --config configs/tpu_v5e_1.py --workdir /content/runs/v5e

State is 16 bytes/param (~4 GB); activations of 16 x 2048 tokens fit with projection outputs kept
(remat "dots_no_batch"). Attention runs in the Pallas TPU kernel ("auto").
"""

from ism_jax.training.config import base_config


def get_config():
  config = base_config()
  config.seed = 0  # parameter init and data shuffle seed

  # Model: 0.25B parameters (16 layers of width 1024, GQA 16/8 heads of 64, SwiGLU 2816, vocab 32000).
  config.model.vocab_size = 32000  # embedding rows (>= tokenizer pieces)
  config.model.embed_dim = 1024  # model width
  config.model.num_layers = 16  # transformer blocks
  config.model.num_heads = 16  # query heads
  config.model.num_kv_heads = 8  # key/value heads (grouped-query attention)
  config.model.head_dim = 64  # per-head width
  config.model.mlp_dim = 2816  # SwiGLU hidden width
  config.model.tie_embeddings = False  # separate output projection
  config.model.compute_dtype = "bfloat16"  # the MXU's native type
  config.model.mask = "ism"  # "ism" | "causal" | "prefix"
  config.model.attention_impl = "auto"  # the Pallas TPU kernel on TPUs
  config.model.scan_layers = True  # one compiled block scanned over layers
  config.model.remat_policy = "dots_no_batch"  # keep projection outputs, recompute the rest

  # Data.
  config.data.name = "chitchat"  # replace with an imported dataset for real training
  config.data.data_dir = "data"  # TFDS data directory
  config.data.vocab_size = 32000  # tokenizer pieces to train (a small corpus yields fewer)
  config.data.seq_len = 2048  # tokens per packed row
  config.data.num_threads = 4  # reader threads (Colab TPU VMs have few cores per chip)
  config.data.eval_max_dialogues = 1000  # validation dialogues per evaluation

  # Optimizer.
  config.optimizer.learning_rate = 6e-4  # peak learning rate
  config.optimizer.warmup_steps = 500  # linear warmup steps
  config.optimizer.min_lr_ratio = 0.1  # final learning rate = 10% of the peak
  config.optimizer.weight_decay = 0.1  # decoupled weight decay on matrices
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping

  # Training: 16 x 2048 = 32k tokens per step.
  config.training.num_steps = 10_000  # optimizer steps (~330M tokens)
  config.training.global_batch_size = 16  # packed rows per step
  config.training.grad_accum_steps = 1  # raise for larger batches at the same memory
  config.training.log_every = 20  # metrics record cadence
  config.training.eval_every = 1000  # evaluation cadence
  config.training.checkpoint_every = 500  # checkpoint cadence (Colab sessions end without warning)
  config.training.keep_checkpoints = 2  # newest checkpoints kept (Colab disk is small)

  config.mesh.data = -1  # one chip
  config.metrics.peak_tflops_per_device = 0.0  # looked up from the device kind (v5e: 197 bf16)
  return config
