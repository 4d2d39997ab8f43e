"""Sampling: the running batch (continuous batching over a KV arena), its decode step, its
kernels."""
