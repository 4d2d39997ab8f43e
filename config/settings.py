"""The settings dataclass and its cross-field checks (config/loader.py fills it in)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BASE_MODEL = "tinkerq/tiny-qwen3"


class SettingsError(ValueError):
    """A setting has a bad value; the message names the value and the limit."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    # --- storage and broker -------------------------------------------------------------
    data_dir: str = _opt(
        "var", "Folder for the SQLite file, checkpoints, the embedded Redis and the default model."
    )
    store_dir: str = _opt(
        "", "Folder of the checkpoint store that every worker and API process reads and writes "
        "(checkpoints, run snapshots); empty = data_dir. On several hosts: one shared mount "
        "(NFS and the like), the same path everywhere."
    )
    database_url: str = _opt(
        "", "SQLAlchemy URL of the durable store; empty = SQLite file <data_dir>/tinkerq.db."
    )
    redis_url: str = _opt(
        "",
        "Redis URL (broker and result doorbell); empty = the embedded Redis on "
        "embedded_redis_port.",
    )
    embedded_redis_port: int = _opt(
        6390, "TCP port of the embedded Redis started when no redis_url is set."
    )
    # --- API ----------------------------------------------------------------------------
    port: int = _opt(8000, "HTTP port of the API.")
    metrics_port: int = _opt(
        9100, "Port of the GPU worker's Prometheus /metrics (the API serves its own at "
        "/metrics on its port); 0 = none. Each worker of a host needs its own.")
    metrics_host: str = _opt("127.0.0.1", "Address the worker's /metrics listens on.")
    log_format: str = _opt(
        "text", "Logs on stderr: text, or json (one object per line, each line of a call with "
        "its request_id, from the API's access line to the worker's tick).")
    access_log: bool = _opt(True, "The API logs one line per HTTP request (method, route, "
                            "status, time, the call's request_id).")
    api_keys: str = _opt("open", "API keys accepted: open = any `tml-` key, a tenant of its own "
                         "(gunicorn then refuses to listen beyond loopback); keys = only those "
                         "made by `python -m app.keys create` and not revoked.")
    long_poll_seconds: float = _opt(
        25.0, "How long retrieve_future holds a request before answering try_again (< 45 s)."
    )
    public_url: str = _opt(
        "", "Base URL clients reach the API at (e.g. https://tinker.example.com), used in signed "
        "download URLs; empty = the host each request came to."
    )
    secret_key: str = _opt(
        "", "Key that signs download URLs; empty = one made at first use and kept in "
        "<data_dir>/secret_key. Give every API host of one deployment the same key."
    )
    download_url_ttl_s: int = _opt(
        3600, "How long a signed download URL of exported weights stays valid, in seconds."
    )
    checkpoint_sweep_s: float = _opt(
        60.0, "How often the worker deletes checkpoints past their ttl_seconds (their rows "
        "and files) and calls past request_retention_s; expired checkpoints are hidden from "
        "listings and loads at once. 0 = never."
    )
    request_retention_s: float = _opt(
        7 * 86400.0, "Finished calls (their rows: inputs and results) are deleted this long "
        "after they finished, by the worker's sweep (checkpoint_sweep_s); kept are those a live "
        "training run may replay after a crash (from its newest snapshot on) and samples "
        "recorded for stable_reinforce until this long after their record expires. "
        "retrieve_future of a deleted call answers 404. 0 = keep forever."
    )
    openai_timeout_s: float = _opt(
        600.0, "How long an OpenAI-compatible call (/v1/...) waits for its sample before "
        "answering 504."
    )
    # --- models -------------------------------------------------------------------------
    base_model: str = _opt(
        DEFAULT_BASE_MODEL,
        "Base model served by the worker: a local folder with config.json + safetensors, a "
        "Hugging Face id found in the local cache, or the built-in tinkerq/tiny-qwen3.",
    )
    model_aliases: str = _opt(
        "", "Extra names accepted for the base model, comma separated (e.g. Qwen/Qwen3-4B)."
    )
    queue: str = _opt("gpu-0", "Celery queue of this GPU worker; new models are assigned to it.")
    dtype: str = _opt("auto", "Base weight dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32.")
    device: str = _opt("auto", "Torch device of the engine: auto, cpu, cuda, cuda:N.")
    # --- engine -------------------------------------------------------------------------
    max_lora_adapters: int = _opt(
        32, "Training adapters resident on the device at once; the least recently used of the "
        "others wait in CPU memory."
    )
    max_models: int = _opt(
        1024, "Training runs one worker keeps, resident or offloaded to CPU memory."
    )
    max_offload_gib: float = _opt(
        0.0, "CPU memory the training runs offloaded from the device may hold, in GiB (weights, "
        "pending gradients, AdamW moments: 4 copies of each adapter); a new run that would "
        "pass it is refused. 0 = half of this machine's memory."
    )
    max_models_per_tenant: int = _opt(
        64, "Training runs (LoRA adapters in training) one API key may keep live at once "
        "(runs of finished sessions, or of sessions idle past session_idle_s, do not count); "
        "past it, creating one answers 429 with Retry-After."
    )
    max_pending_per_tenant: int = _opt(
        2048, "Calls one API key may have accepted and not yet answered; past it the API "
        "answers 429 with Retry-After, which the SDK waits out and sends again.")
    max_pending_per_queue: int = _opt(
        16384, "Calls a worker's queue may hold unanswered, from every key; past it the API "
        "answers 429 with Retry-After rather than letting the queue grow.")
    session_idle_s: float = _opt(
        600.0, "A session with no heartbeat for this long counts as gone (the SDK beats every "
        "10 s)."
    )
    release_idle_s: float = _opt(
        600.0, "A training run with no call for this long is released: the worker writes its "
        "whole state (weights, pending gradients, AdamW moments) to its disk and frees its "
        "memory; the run's next call loads it back, exactly. 0 = never."
    )
    max_lora_rank: int = _opt(64, "Largest LoRA rank a model may ask for.")
    lora_alpha: float = _opt(32.0, "LoRA alpha; an adapter's scale is lora_alpha / rank.")
    max_sampler_adapters: int = _opt(
        8, "Saved sampler adapters cached for sampling (least recently used is dropped)."
    )
    sample_max_num_sequences: int = _opt(
        256, "Sequences in the sampler's running batch at once; more requests wait their turn."
    )
    sample_max_pending: int = _opt(
        4096, "Unanswered samples a worker's queue may hold before a client that accepts "
        "backpressure (the SDK's X-Tinker-Sampling-Backpressure) gets 429 and sends again."
    )
    sample_kv_tokens: int = _opt(
        0, "Tokens of the sampler's KV cache (paged: sequences take blocks of 32 tokens as "
        "they grow, and the samples of a prompt share its blocks); 0 = 30% of the GPU memory "
        "free when it starts."
    )
    sample_kv_dtype: str = _opt(
        "model", "What the sampler's KV cache stores keys and values in: model = the base "
        "weights' dtype; fp8 = float8 e4m3 (1 byte: twice the tokens of bf16 in the same "
        "memory and half the attention's reads; each key and value rounded to 3 mantissa "
        "bits, which moves sampled logprobs a little: benchmarks/kv_fp8.py measures it; on "
        "CUDA it needs compute capability 8.9 or newer)."
    )
    sample_steps_per_tick: int = _opt(
        32, "Decode steps the running batch takes per engine tick, between training passes."
    )
    sample_cuda_graphs: bool = _opt(
        True, "Run decode steps as CUDA graphs, one per batch-size bucket (CUDA only)."
    )
    sample_fused_step: bool = _opt(
        True, "Decode and sample with the fused Triton kernels (CUDA with Triton only); off: "
        "eager glue and the compiled sampling."
    )
    max_tokens_per_tick: int = _opt(
        65536, "Token budget of one forward/backward pass across all models in a tick."
    )
    train_micro_batch_size: int = _opt(
        0, "Tokens per packed micro-batch of a training pass; 0 = sized from free GPU memory."
    )
    train_share_prefixes: bool = _opt(
        True, "In a training pass, rows of one model whose first tokens (and targets) agree, "
        "as the samples of one RL prompt do, run those tokens once (16 or more)."
    )
    gradient_checkpointing: bool = _opt(
        False, "Recompute each layer's activations in the backward pass (less memory)."
    )
    compile_kernels: bool = _opt(
        True, "torch.compile the training pass's element-wise kernels (CUDA only)."
    )
    loss_chunk_tokens: int = _opt(
        4096, "Tokens whose full-vocabulary logits are materialised at once on the loss side."
    )
    max_sample_tokens: int = _opt(4096, "Upper limit on a sample request's max_tokens.")
    max_seq_len: int = _opt(8192, "Longest datum or prompt + completion, in tokens.")
    seq_gap_timeout_s: float = _opt(
        300.0, "How long a model's request waits for a missing earlier seq_id before failing."
    )
    tick_gather_ms: float = _opt(
        5.0, "How long the engine waits after the first queued call to gather a tick's batch."
    )
    worker_concurrency: int = _opt(
        256, "Celery threads in the GPU worker: calls that can wait on the engine at once."
    )
    tensor_parallel_size: int = _opt(1, "GPUs the worker spreads the model over (1 = no TP).")
    data_parallel_size: int = _opt(
        1, "Replicas of the (tensor-parallel) model in the worker, each on its own GPUs: a "
        "tick's datums and samples are split over them (data_parallel_size × "
        "tensor_parallel_size GPUs in all).")
    # --- durability -----------------------------------------------------------------------
    snapshot_every_steps: int = _opt(
        8, "A training run's state (weights, AdamW moments) is snapshotted to data_dir after "
        "every this many optim_steps, and at its creation; a worker that restarts rebuilds each "
        "run from its last snapshot and the calls after it. 0 = no snapshots (a restart loses "
        "unsaved runs)."
    )
    snapshot_every_s: float = _opt(
        600.0, "Snapshot a run at its next optim_step once this many seconds have passed since "
        "its last snapshot, whatever snapshot_every_steps says."
    )
    snapshot_max_duty: float = _opt(
        0.015, "Snapshots due by snapshot_every_steps wait while the snapshot writer has been "
        "busy more than this share of the last minute (each second it writes slows a "
        "CPU-bound tick by most of a second); snapshot_every_s still forces one. 0 = no limit."
    )
    resend_after_s: float = _opt(
        10.0, "The worker sends again a call of its queue that has waited this long, that it "
        "does not hold and that is not in the broker's queue (its message was lost: a Redis "
        "restart, an API killed between writing and sending)."
    )
    worker_lost_s: float = _opt(
        600.0, "A call pending this long on a queue whose worker has not been seen (heartbeat) "
        "for this long fails with a server error instead of waiting for ever."
    )
    failover_after_s: float = _opt(
        60.0, "A worker is live while it beat within this many seconds (new runs and "
        "sampling sessions go to live workers). A queue whose workers have all been silent "
        "this long is taken over by a live worker of the same base model: its runs (rebuilt "
        "from their snapshots and calls), samplers and pending calls move there. A worker "
        "that could not beat for this long stops, to restart with nothing stale in memory."
    )
    random_seed: int = _opt(
        -1, "Seed of the worker's own random choices: the LoRA init of a create call without a "
        "seed and the sampling seed of a request without one, in the order they come; -1 = a "
        "fresh seed at each start. Set it to replay a run."
    )

    # --- derived --------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'tinkerq.db'}"

    @property
    def redis(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    @property
    def uses_embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def world_size(self) -> int:
        """The worker's ranks (one process and GPU each): replicas × tensor-parallel ranks."""
        return self.data_parallel_size * self.tensor_parallel_size

    @property
    def store_path(self) -> Path:
        """The shared checkpoint store (store_dir, or data_dir)."""
        return Path(self.store_dir).resolve() if self.store_dir else self.data_path

    @property
    def checkpoint_root(self) -> Path:
        return self.store_path / "checkpoints"

    @property
    def released_dir(self) -> Path:
        """Where this worker keeps the state of the runs it released (see release_idle_s)."""
        return self.data_path / "released" / self.queue

    @property
    def snapshot_root(self) -> Path:
        """The training runs' snapshots (see snapshot_every_steps), shared by the workers."""
        return self.store_path / "snapshots"

    @property
    def offload_budget_bytes(self) -> int:
        """max_offload_gib in bytes; 0 means half of the machine's physical memory."""
        if self.max_offload_gib > 0:
            return int(self.max_offload_gib * 2**30)
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2

    def served_model_names(self) -> list[str]:
        """Names a client may pass as base_model for this worker's model."""
        names = [self.base_model] + [a.strip() for a in self.model_aliases.split(",")]
        return [n for n in dict.fromkeys(names) if n]

    def validate(self) -> Settings:
        for name in ("max_lora_adapters", "max_models", "max_lora_rank", "max_sampler_adapters",
                     "sample_max_num_sequences", "sample_steps_per_tick",
                     "max_tokens_per_tick", "max_sample_tokens", "max_seq_len",
                     "loss_chunk_tokens", "max_models_per_tenant", "max_pending_per_tenant",
                     "max_pending_per_queue",
                     "worker_concurrency", "tensor_parallel_size", "data_parallel_size",
                     "download_url_ttl_s",
                     "sample_max_pending"):
            value = getattr(self, name)
            if value < 1:
                raise SettingsError(f"{name}={value} must be at least 1")
        if self.snapshot_every_steps < 0 or self.snapshot_every_s <= 0:
            raise SettingsError(f"snapshot_every_steps={self.snapshot_every_steps} must be >= 0 "
                                f"and snapshot_every_s={self.snapshot_every_s} > 0")
        if not 0 <= self.snapshot_max_duty < 1:
            raise SettingsError(f"snapshot_max_duty={self.snapshot_max_duty} must be in [0, 1)")
        if self.resend_after_s <= 0 or self.worker_lost_s <= 0:
            raise SettingsError(f"resend_after_s={self.resend_after_s} and worker_lost_s="
                                f"{self.worker_lost_s} must be above 0")
        if not 0 < self.failover_after_s < self.worker_lost_s:
            raise SettingsError(f"failover_after_s={self.failover_after_s} must be above 0 and "
                                f"below worker_lost_s={self.worker_lost_s}")
        if self.checkpoint_sweep_s < 0 or self.request_retention_s < 0:
            raise SettingsError(f"checkpoint_sweep_s={self.checkpoint_sweep_s} and "
                                f"request_retention_s={self.request_retention_s} must be >= 0")
        if self.max_offload_gib < 0 or self.release_idle_s < 0 or self.session_idle_s <= 0:
            raise SettingsError(f"max_offload_gib={self.max_offload_gib} and release_idle_s="
                                f"{self.release_idle_s} must be >= 0, session_idle_s="
                                f"{self.session_idle_s} > 0")
        if self.random_seed < -1:
            raise SettingsError(f"random_seed={self.random_seed} must be -1 (fresh) or at least 0")
        if not 0 < self.long_poll_seconds < 45:
            raise SettingsError(
                f"long_poll_seconds={self.long_poll_seconds} must be in (0, 45): the SDK gives "
                "up on a poll after 45 s"
            )
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"log_format={self.log_format!r} must be one of text, json")
        if not 0 <= self.metrics_port < 65536:
            raise SettingsError(f"metrics_port={self.metrics_port} must be in [0, 65535]")
        if self.api_keys not in ("open", "keys"):
            raise SettingsError(f"api_keys={self.api_keys!r} must be one of open, keys")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise SettingsError(f"dtype={self.dtype!r} must be one of auto, bf16, fp32")
        if self.sample_kv_dtype not in ("model", "fp8"):
            raise SettingsError(f"sample_kv_dtype={self.sample_kv_dtype!r} must be one of "
                                "model, fp8")
        if self.max_sample_tokens >= self.max_seq_len:
            raise SettingsError(
                f"max_sample_tokens={self.max_sample_tokens} must be below "
                f"max_seq_len={self.max_seq_len}"
            )
        return self
