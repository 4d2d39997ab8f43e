"""The GPU worker: tick loop, scheduler, multi-LoRA model, sampler, optimizer, checkpoints."""
