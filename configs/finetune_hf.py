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
  # The architecture fields (vocab, widths, heads, RoPE, norm eps, biases, tying) are read from the
  # checkpoint; the rest is the base's (bfloat16 compute over float32 master weights, the ISM mask, "auto"
  # attention) plus these differences.
  config = pretrained_config(checkpoint)
  config.model.scan_layers = True  # one stacked block under jax.lax.scan: fast compiles for deep models
  config.model.remat_policy = "full"  # recompute activations in the backward pass (long sequences fit)

  # Data: a JSONL chat file imported with `python -m ism_jax.data.import_jsonl --name my_chats`.
  config.data.name = "my_chats"  # the imported dataset's name
  config.data.seq_len = 2048  # tokens per packed row (longer dialogues lose later rounds)
  config.data.eval_max_dialogues = 200  # validation dialogues per evaluation

  config.optimizer.learning_rate = 1e-5  # peak learning rate (pretrained weights: small steps)
  config.optimizer.warmup_steps = 50  # linear warmup steps
  config.optimizer.weight_decay = 0.0  # no decay towards zero for pretrained weights

  # 1,000 steps of 16 x 2,048 tokens.
  config.training.global_batch_size = 16  # packed rows per step, over all hosts
  config.training.keep_checkpoints = 2  # newest checkpoints kept

  # Mesh: parameters and optimizer state sharded over every device (FSDP), batch split likewise.
  config.mesh.data = 1  # no pure data parallelism
  config.mesh.fsdp = -1  # all devices shard parameters (a model larger than one device fits)

  config.sample.rounds = 2  # rounds of the sample chat
  config.sample.max_answer_tokens = 64  # answer length limit
  return config
