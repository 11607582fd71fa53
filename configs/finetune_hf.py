"""Fine-tune a Hugging Face Llama / Qwen2 / Mistral checkpoint with the ISM mask on a JSONL chat file.

    # 1. the chat file becomes a TFDS dataset (OpenAI "messages" or ShareGPT "conversations" per line)
    python -m ism_jax.data.import_jsonl --input chats.jsonl --format openai --name my_chats --data_dir data
    # 2. fine-tune; after ':' a checkpoint directory (config.json + safetensors + tokenizer) or a .gguf file
    python train.py --config configs/finetune_hf.py:/ckpt/Qwen2.5-0.5B-Instruct --workdir runs/ft \\
        --config.data.name=my_chats
    # 3. export the result for transformers / vLLM: see docs/HF.md

The model fields are read from the checkpoint (architecture, RoPE, norm epsilon, tied embeddings), so they
always match the weights that ``init_from`` loads; the tokenizer and chat template are the checkpoint's own
(:func:`ism_jax.convert.load_pretrained_tokenizer`). Without an argument the config points
at the tiny test checkpoint tests/fixtures/hf/qwen2 (a smoke run, not a useful model).
"""

import os

from ism_jax.training.config import pretrained_config

_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf", "qwen2")


def get_config(checkpoint: str = _TINY):
  # Model: the architecture fields (vocab, widths, heads, RoPE, norm eps, biases, tying) are read from the
  # checkpoint; the rest is how to run it.
  config = pretrained_config(checkpoint)
  config.model.param_dtype = "float32"  # master weights (AdamW state alike)
  config.model.compute_dtype = "bfloat16"  # matmuls in bfloat16; use "float32" on CPU
  config.model.mask = "ism"  # "ism" | "causal" | "prefix"
  config.model.attention_impl = "auto"  # chunked XLA on CPU, Pallas kernels on GPU/TPU
  config.model.scan_layers = True  # one stacked block under jax.lax.scan: fast compiles for deep models
  config.model.remat_policy = "full"  # recompute activations in the backward pass (long sequences fit)

  # Data: a JSONL chat file imported with `python -m ism_jax.data.import_jsonl --name my_chats`.
  config.data.name = "my_chats"  # the imported dataset's name
  config.data.data_dir = "data"  # where import_jsonl wrote it
  config.data.seq_len = 2048  # tokens per packed row (longer dialogues lose later rounds)
  config.data.loss_on = "all"  # train on every answer of a dialogue
  config.data.eval_max_dialogues = 200  # validation dialogues per evaluation

  # Optimizer: a fine-tuning learning rate, short warmup, cosine to 10%, no weight decay.
  config.optimizer.learning_rate = 1e-5  # peak learning rate (pretrained weights: small steps)
  config.optimizer.warmup_steps = 50  # linear warmup steps
  config.optimizer.min_lr_ratio = 0.1  # final learning rate = 10% of the peak
  config.optimizer.weight_decay = 0.0  # no decay towards zero for pretrained weights
  config.optimizer.grad_clip_norm = 1.0  # global-norm clipping

  # Training: 1,000 steps of 16 x 2,048 tokens.
  config.training.num_steps = 1000  # optimizer steps
  config.training.global_batch_size = 16  # packed rows per step, over all hosts
  config.training.grad_accum_steps = 1  # raise to fit a large batch in memory
  config.training.log_every = 10  # metrics record every 10 steps
  config.training.eval_every = 200  # eval answer loss per round every 200 steps
  config.training.checkpoint_every = 200  # checkpoint every 200 steps (and at the end)
  config.training.keep_checkpoints = 2  # newest checkpoints kept
  config.training.async_checkpoints = True  # write checkpoints in the background

  # Mesh: parameters and optimizer state sharded over every device (FSDP), batch split likewise.
  config.mesh.data = 1  # no pure data parallelism
  config.mesh.fsdp = -1  # all devices shard parameters (a model larger than one device fits)
  config.mesh.tensor = 1  # no tensor parallelism

  # The chat printed at the end: user turns of validation dialogues, model answers greedy.
  config.sample.enabled = True  # print the sample chat
  config.sample.dialogues = 1  # one dialogue
  config.sample.rounds = 2  # two rounds
  config.sample.max_answer_tokens = 64  # answer length limit
  return config
