"""Training: run config, optimizer, jitted train/eval steps, Orbax checkpoints, metrics, the loop.

Modules (each one job):

    config         the run-config schema (ml_collections), validation, config files and overrides
    optimizer      AdamW + warmup/cosine schedule + gradient clipping
    train_step     sharded parameters, the jitted train step (with gradient accumulation) and eval step
    flops          model FLOPs and MFU
    checkpointing  Orbax CheckpointManager and the files the trainer writes (ism_jax.workdir: the layout)
    metrics        metrics.jsonl, TensorBoard, progress bar
    evaluation     per-round answer loss and exact match
    inputs         the run config converted once into ism_jax.data.pipeline's config; batch checks
    sample         a short greedy multi-turn chat after training, through ism_jax.inference.ChatSession
    loop           train(config, workdir): everything above put together

This package imports nothing heavy at import time, so ``ism_jax.training.train_step`` runs on machines
without ml_collections or grain (the GPU benchmark).
"""
