"""The GPU worker: engine tick loop, scheduler, model + multi-LoRA, sampler, optimizer, checkpoints."""
