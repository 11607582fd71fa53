"""Synthetic multi-turn task (ism_jax.data.synthetic): remember facts across rounds, answer exactly.

    python train.py --config configs/synthetic.py --workdir runs/synthetic
    python train.py --config configs/synthetic.py --workdir runs/synthetic_causal --config.model.mask=causal

Each round states facts ("cat is 4") and asks about names bound in this or earlier rounds, with the
operation word last ("cat dog sum ?"). Answers are 1–3 words, so teacher-forced exact match per answer
(eval/exact_match, also per round) measures the task directly. On 2 CPU cores a step takes ~0.8 s: after
600 steps (10 minutes) the eval answer loss is 0.59 and exact match 21%; the full 2,000 steps take about
half an hour. Comparing masks means running this config with --config.model.mask=ism|causal|prefix (the
prefix baseline trains on one example per round, the base's data.prefix_triplets).
"""

from ism_jax.training.config import base_config


def get_config():
  config = base_config(model="1m")  # width 128, 4 layers, heads of 32 (~1.1M parameters with the lines below)

  config.model.vocab_size = 320  # embedding rows (the task's tokenizer has 300 pieces)
  config.model.num_kv_heads = 4  # one key/value head per query head
  config.model.mlp_dim = 512  # SwiGLU hidden width
  config.model.tie_embeddings = True  # output projection = embedding table
  config.model.compute_dtype = "float32"  # CPU: float32 matmuls

  # 20,000 seeded training dialogues of 2–6 rounds (built in seconds).
  config.data.name = "synthetic_multiturn"  # the synthetic TFDS dataset (config "default")
  config.data.vocab_size = 300  # tokenizer pieces (the minimum: the task has ~30 words)
  config.data.seq_len = 256  # tokens per packed row (a whole dialogue fits)
  config.data.eval_max_dialogues = 500  # validation dialogues per evaluation

  config.optimizer.learning_rate = 3e-3  # peak learning rate
  config.optimizer.min_lr_ratio = 0.05  # final learning rate = 5% of the peak
  config.optimizer.weight_decay = 0.05  # decoupled weight decay on matrices

  # 2,000 steps of 16 x 256 tokens.
  config.training.num_steps = 2000  # optimizer steps
  config.training.global_batch_size = 16  # packed rows per step
  config.training.log_every = 50  # metrics record every 50 steps
  config.training.eval_every = 500  # eval loss and exact match per round every 500 steps
  config.training.checkpoint_every = 500  # checkpoint cadence
  config.training.keep_checkpoints = 2  # newest checkpoints kept

  config.sample.rounds = 4  # rounds of the sample dialogue
  config.sample.max_answer_tokens = 16  # answers are a few words
  return config
