"""~3B-parameter ISM model on one 8-GPU host (8 x 80 GB), sequence 4096, fully sharded (FSDP over 8).

    python train.py --config configs/gpu_8x.py --workdir runs/gpu_8x --config.data.name=my_chats

Parameters, gradients and AdamW moments (16 bytes/param, ~48 GB) are sharded over the 8 GPUs (ZeRO-3
style: the 'fsdp' mesh axis), so each GPU holds ~6 GB of state; the batch is split over the same axis.
For 2 x 8 GPUs on two nodes, see docs/TRAINING.md (multi-host) and set mesh.data=2.
"""

from ism_jax.training.config import base_config


def get_config():
  config = base_config()
  config.seed = 0  # parameter init and data shuffle seed

  # Model: 3.0B parameters (28 layers of width 3072, GQA 24/8 heads of 128, SwiGLU 8192, vocab 32000).
  config.model.vocab_size = 32000  # embedding rows (>= tokenizer pieces)
  config.model.embed_dim = 3072  # model width
  config.model.num_layers = 28  # transformer blocks
  config.model.num_heads = 24  # query heads
  config.model.num_kv_heads = 8  # key/value heads (grouped-query attention)
  config.model.head_dim = 128  # per-head width
  config.model.mlp_dim = 8192  # SwiGLU hidden width
  config.model.rope_theta = 500_000.0  # RoPE base for long contexts
  config.model.tie_embeddings = False  # separate output projection
  config.model.compute_dtype = "bfloat16"  # matmuls in bf16
  config.model.mask = "ism"  # "ism" | "causal" | "prefix"
  config.model.attention_impl = "auto"  # the Pallas GPU kernel on GPUs
  config.model.scan_layers = True  # one compiled block scanned over layers
  config.model.remat_policy = "dots_no_batch"  # keep projection outputs, recompute the rest

  # Data.
  config.data.name = "chitchat"  # replace with an imported dataset for real training
  config.data.data_dir = "data"  # TFDS data directory (shared by all processes of a multi-host job)
  config.data.vocab_size = 32000  # tokenizer pieces to train
  config.data.seq_len = 4096  # tokens per packed row
  config.data.num_threads = 16  # reader threads (tokenization)
  config.data.eval_max_dialogues = 4000  # validation dialogues per evaluation

  # Optimizer.
  config.optimizer.learning_rate = 2e-4  # peak learning rate
  config.optimizer.warmup_steps = 2000  # linear warmup steps
  config.optimizer.min_lr_ratio = 0.1  # final learning rate = 10% of the peak
  config.optimizer.weight_decay = 0.1  # decoupled weight decay on matrices
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping

  # Training: 64 x 4096 = 262k tokens per step (8 rows per GPU).
  config.training.num_steps = 50_000  # optimizer steps (~13B tokens)
  config.training.global_batch_size = 64  # packed rows per step, all GPUs together
  config.training.grad_accum_steps = 1  # raise for larger batches at the same memory
  config.training.log_every = 20  # metrics record cadence
  config.training.eval_every = 2000  # evaluation cadence
  config.training.checkpoint_every = 1000  # checkpoint cadence
  config.training.keep_checkpoints = 3  # newest checkpoints kept

  config.mesh.data = 1  # no pure data parallelism inside the host
  config.mesh.fsdp = -1  # shard parameters and batch over all 8 GPUs
  config.mesh.tensor = 1  # no tensor parallelism (use tensor=2..8 for wider models)
  return config
