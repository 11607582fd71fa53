"""~1B-parameter Llama-style ISM model, sequence 4096, on one H100 (80 GB). Also the benchmark's model.

    python train.py --config configs/h100_1b.py --workdir runs/h100_1b --config.data.name=my_chats

Memory (bf16 compute, float32 parameters and AdamW moments): 16 bytes/param = ~16 GB of state, plus
activations of 8 x 4096 tokens with the projections' outputs kept for the backward pass (remat
"dots_no_batch") and the float32 logits. The data defaults to chitchat (small); import your own
conversations with `python -m ism_jax.data.import_jsonl` and set data.name. Everything not set here is the
base's: vocabulary 32000, bfloat16 compute, float32 parameters, AdamW at 3e-4, 8 rows per step, one GPU.
"""

from ism_jax.training.config import base_config


def get_config():
  config = base_config(model="1b")  # 0.98B: 18 layers of width 2048, GQA 16/8 heads of 128, SwiGLU 5632

  config.model.rope_theta = 500_000.0  # RoPE base for long contexts
  config.model.scan_layers = True  # one compiled block scanned over layers (fast compile)
  config.model.remat_policy = "dots_no_batch"  # keep projection outputs, recompute the rest

  config.data.vocab_size = 32000  # tokenizer pieces to train (a small corpus yields fewer)
  config.data.seq_len = 4096  # tokens per packed row
  config.data.num_threads = 8  # reader threads (tokenization)
  config.data.eval_max_dialogues = 2000  # validation dialogues per evaluation

  config.optimizer.warmup_steps = 1000  # linear warmup steps

  # 8 x 4096 = 32k tokens per step.
  config.training.num_steps = 20_000  # optimizer steps (~650M tokens)
  config.training.log_every = 20  # metrics record cadence
  config.training.eval_every = 1000  # evaluation cadence
  config.training.checkpoint_every = 1000  # checkpoint cadence
  return config
