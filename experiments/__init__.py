"""Experiments run on top of ism_jax; each folder holds one runner, its protocol and its raw results."""
