"""~1B-parameter Llama-style ISM model, sequence 4096, on one H100 (80 GB). Also the benchmark's model.

    python train.py --config configs/h100_1b.py --workdir runs/h100_1b --config.data.name=my_chats

Memory (bf16 compute, float32 parameters and AdamW moments): 16 bytes/param = ~16 GB of state, plus
activations of 8 x 4096 tokens with the projections' outputs kept for the backward pass (remat
"dots_no_batch") and the float32 logits. The data defaults to chitchat (small); import your own
conversations with `python -m ism_jax.data.import_jsonl` and set data.name.
"""

from ism_jax.training.config import base_config


def get_config():
  config = base_config()
  config.seed = 0  # parameter init and data shuffle seed

  # Model: 0.98B parameters (18 layers of width 2048, GQA 16/8 heads of 128, SwiGLU 5632, vocab 32000).
  config.model.vocab_size = 32000  # embedding rows (>= tokenizer pieces)
  config.model.embed_dim = 2048  # model width
  config.model.num_layers = 18  # transformer blocks
  config.model.num_heads = 16  # query heads
  config.model.num_kv_heads = 8  # key/value heads (grouped-query attention)
  config.model.head_dim = 128  # per-head width
  config.model.mlp_dim = 5632  # SwiGLU hidden width
  config.model.rope_theta = 500_000.0  # RoPE base for long contexts
  config.model.tie_embeddings = False  # separate output projection
  config.model.param_dtype = "float32"  # master weights
  config.model.compute_dtype = "bfloat16"  # matmuls in bf16
  config.model.mask = "ism"  # "ism" | "causal" | "prefix"
  config.model.attention_impl = "auto"  # the Pallas GPU kernel on GPUs
  config.model.scan_layers = True  # one compiled block scanned over layers (fast compile)
  config.model.remat_policy = "dots_no_batch"  # keep projection outputs, recompute the rest

  # Data.
  config.data.name = "chitchat"  # replace with an imported dataset for real training
  config.data.data_dir = "data"  # TFDS data directory
  config.data.vocab_size = 32000  # tokenizer pieces to train (a small corpus yields fewer)
  config.data.seq_len = 4096  # tokens per packed row
  config.data.loss_on = "all"  # train on every answer
  config.data.num_threads = 8  # reader threads (tokenization)
  config.data.eval_max_dialogues = 2000  # validation dialogues per evaluation

  # Optimizer.
  config.optimizer.learning_rate = 3e-4  # peak learning rate
  config.optimizer.warmup_steps = 1000  # linear warmup steps
  config.optimizer.min_lr_ratio = 0.1  # final learning rate = 10% of the peak
  config.optimizer.weight_decay = 0.1  # decoupled weight decay on matrices
  config.optimizer.b2 = 0.95  # Adam second-moment decay
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping

  # Training: 8 x 4096 = 32k tokens per step.
  config.training.num_steps = 20_000  # optimizer steps (~650M tokens)
  config.training.global_batch_size = 8  # packed rows per step
  config.training.grad_accum_steps = 1  # raise (e.g. 4) for larger batches at the same memory
  config.training.log_every = 20  # metrics record cadence
  config.training.eval_every = 1000  # evaluation cadence
  config.training.checkpoint_every = 1000  # checkpoint cadence
  config.training.keep_checkpoints = 3  # newest checkpoints kept
  config.training.async_checkpoints = True  # save in the background

  config.mesh.data = -1  # one GPU: data = 1
  config.mesh.fsdp = 1  # no parameter sharding
  config.mesh.tensor = 1  # no tensor parallelism

  config.metrics.peak_tflops_per_device = 0.0  # looked up from the device kind (H100: 989 bf16)
  config.sample.enabled = True  # print a sample chat at the end
  return config
