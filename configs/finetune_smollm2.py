"""GPU recipe: fine-tune SmolLM2-135M-Instruct with the ISM mask on the whole Chit-Chat train split.

    python train.py --config configs/finetune_smollm2.py --workdir runs/smollm2
    python chat.py --workdir runs/smollm2                    # chat with the result (KV cache reused)

bf16 compute over float32 master weights, sequence 2048, 16 rows per step (32k tokens), the Pallas ISM
kernel on GPUs. Tokens/s and MFU on one H200 are in docs/BENCHMARKS.md. The CPU quick start
(configs/default.py) is the same model and data at a toy scale.
"""

from ism_jax.training.config import pretrained_config


def get_config():
  config = pretrained_config("smollm2")  # SmolLM2-135M-Instruct: architecture, weights and tokenizer
  config.model.scan_layers = True  # one compiled block scanned over the 30 layers

  config.data.seq_len = 2048  # tokens per packed row (whole chitchat dialogues fit)
  config.data.num_threads = 8  # reader threads (tokenization)

  config.optimizer.learning_rate = 5e-5  # peak learning rate for full fine-tuning
  config.optimizer.warmup_steps = 20  # linear warmup steps
  config.optimizer.weight_decay = 0.0  # no decay towards zero for pretrained weights

  config.training.num_steps = 300  # ~10M tokens: about two passes over chitchat train
  config.training.global_batch_size = 16  # packed rows per step (32k tokens)
  config.training.log_every = 20  # metrics record every 20 steps
  config.training.eval_every = 100  # eval answer loss per round every 100 steps (and at step 0)
  config.training.checkpoint_every = 100  # checkpoint every 100 steps (and at the end)
  return config
