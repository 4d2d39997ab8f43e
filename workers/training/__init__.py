"""Training: the packed stream of a batch, the fast-path kernels, the losses, AdamW and the
trainer."""
