"""Training: run config, optimizer, jitted train/eval steps, Orbax checkpoints, metrics, the loop.

Modules (each one job):

    config         the run-config schema (ml_collections), validation, config files and overrides
    optimizer      AdamW + warmup/cosine schedule + gradient clipping
    train_step     sharded parameters, the jitted train step (with gradient accumulation) and eval step
    flops          model FLOPs and MFU
    checkpointing  Orbax CheckpointManager, workdir layout, restore_for_inference
    metrics        metrics.jsonl, TensorBoard, progress bar
    evaluation     per-round answer loss and exact match
    inputs         the trainer's use of ism_jax.data.pipeline
    sample         a short greedy multi-turn chat after training
    loop           train(config, workdir): everything above put together

This package imports nothing heavy at import time, so ``ism_jax.training.train_step`` runs on machines
without ml_collections or grain (the GPU benchmark).
"""
