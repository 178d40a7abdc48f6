"""Service settings: environment variables prefixed SMOLLM_ (e.g. SMOLLM_MAX_BATCH_SIZE), overridden by the
command-line flags of `python -m service`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMOLLM_", case_sensitive=False, extra="ignore")

    checkpoint: str | None = Field(
        None,
        description="a checkpoint directory, or a trainer output directory whose newest complete checkpoint is "
        "served and watched; unset: the embedded SmolLM2-135M-Instruct",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="weights and activations (and the KV cache, see kv_cache_dtype): auto is bfloat16 where the "
        "hardware computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), float32 elsewhere (emulated "
        "bf16 is ~100x slower)",
    )
    quant: Literal["none", "int8", "int4"] = Field(
        "none", description="weight-only quantization of the linear layers after loading (needs model.quant)"
    )
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="what the KV cache stores: auto is float16 under a quantized (int8/int4) float32 model, whose "
        "attention then reads half the bytes, and the compute dtype otherwise",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    max_batch_size: int = Field(64, ge=1, description="concurrent running sequences (KV cache slots)")
    kv_cache_memory: float | None = Field(
        None, gt=0, description="GiB the KV cache may take: fewer slots than max_batch_size when they do not fit"
    )
    max_context: int = Field(2048, ge=2, description="tokens per sequence, prompt included")
    max_queue: int = Field(64, ge=0, description="requests allowed to wait for a slot before 429")
    request_timeout: float = Field(300.0, gt=0, description="seconds a request may take in total")
    api_key: SecretStr | None = Field(None, description="when set, requests need 'Authorization: Bearer KEY'")
    api_key_file: Path | None = Field(
        None, description="a file holding the API key (a Docker or Kubernetes secret; keeps it out of `ps`)"
    )
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest accepted request body (413 above)")
    body_read_timeout: float = Field(
        30.0, gt=0, description="seconds a client may take to send its whole request body (408 after)"
    )
    sse_send_timeout: float = Field(
        30.0, gt=0, description="seconds a stream waits for a client that stopped reading before dropping it"
    )
    limit_concurrency: int | None = Field(
        1024, ge=1, description="open connections and requests beyond which the server answers 503 at once"
    )
    reload_interval: float = Field(5.0, ge=0, description="seconds between checkpoint polls; 0 disables")
    reload_max_loss_increase: float | None = Field(
        None,
        ge=0,
        description="refuse a checkpoint whose recorded validation loss exceeds the served one's by more "
        "than this (unset: no gate; a non-finite recorded loss is always refused)",
    )
    reload_retry_after: float = Field(
        60.0, gt=0, description="seconds before a checkpoint whose swap failed is tried again"
    )
    drain_timeout: float = Field(
        2.0, ge=0, description="seconds a hot reload waits for running requests before moving them to the new model"
    )
    stall_timeout: float = Field(
        60.0, gt=0, description="/healthz fails when work is pending and the engine made no step for this long"
    )
    prefill_chunk: int = Field(512, ge=1, description="prompt tokens per prefill step")
    prefill_group: int = Field(
        64,
        ge=1,
        description="native int4 kernels: prompt tokens a step holds at most besides its first prompt (further "
        "prompts join whole): a burst of requests is prefilled a few at a time, so most get their first token "
        "before the last prompt is computed",
    )
    max_decode_stall: float = Field(
        1.0,
        ge=0,
        description="seconds a running stream may wait for its next token while a burst of new prompts (at least as "
        "many as the running streams) is prefilled ahead of it (0: running streams are decoded at least every other "
        "step)",
    )
    recompute_chunk: int = Field(
        64, ge=1, description="tokens per step recomputed for the requests a hot reload moved to the new model"
    )
    log_level: str = Field("INFO", description="logging level")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds SIGTERM waits for running requests")
    pack_weights: bool = Field(True, description="CPU: reorder linear weights for oneDNN once at load (faster steps)")
    compile: Literal["off", "decode"] = Field(
        "off",
        description="decode: run decode steps through torch.compile (CUDA graphs on CUDA: one stream 7.4x faster "
        "through the engine on an H200; on the 2-core AVX2 CPU ~2x slower), one graph per batch and key-count "
        "bucket, compiled on first use; "
        "prefill stays eager; CPU weights are then not packed (inductor cannot trace oneDNN's packed layout); a "
        "failed compile logs a warning and decodes eagerly",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")

    @model_validator(mode="after")
    def _read_api_key_file(self) -> Settings:
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError("api_key_file: set either api_key or api_key_file, not both")
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"api_key_file: cannot read {self.api_key_file}: {e}") from None
        if not key:
            raise ValueError(f"api_key_file: {self.api_key_file} is empty")
        self.api_key = SecretStr(key)
        return self
