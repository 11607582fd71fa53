"""ISM vs causal vs prefix fine-tuning of SmolLM2-135M-Instruct (docs/EXPERIMENTS.md)."""
