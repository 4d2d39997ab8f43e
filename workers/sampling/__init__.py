"""Sampling: the running batch (continuous batching over a paged KV cache), its decode step, its
kernels."""
