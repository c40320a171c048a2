"""Service settings: from `retina-serve` flags, or from environment variables prefixed `RETINA_`
(`RETINA_BUNDLE`, `RETINA_INDEX`, `RETINA_RUNTIME`, `RETINA_API_KEY`, `RETINA_MAX_UPLOAD_MB`, ...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MEGABYTE = 1024 * 1024


class ServiceSettings(BaseSettings):
    """Everything the service can be configured with; every field has an environment variable
    `RETINA_<FIELD>` (e.g. `RETINA_MAX_UPLOAD_MB=5`)."""

    model_config = SettingsConfigDict(env_prefix="RETINA_", extra="ignore", env_ignore_empty=True)

    bundle: Path | None = Field(default=None, description="The bundle folder (`retina-train export`).")
    index: Path | None = Field(default=None, description="The index folder (`retina-index build`).")
    store: Literal["faiss", "milvus"] | None = Field(
        default=None,
        description="The store the index must use (its index.json says which; a mismatch fails the load). "
        "None: either.",
    )
    milvus_uri: str | None = Field(
        default=None,
        description="A Milvus-backed index: reach its collections at this URI (a milvus-lite .db file or "
        "http://HOST:19530) instead of the one recorded in index.json. milvus-lite: one process per file.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, description="uvicorn worker processes, each with its own model copy.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runtime: Literal["onnxruntime", "openvino"] = Field(
        default="onnxruntime",
        description="The inference engine of the bundle's graphs. openvino (CPU only; needs the `openvino` extra) "
        "runs the encoders' OpenVINO INT8 IR when the bundle has it (`retina-train export --openvino-int8`), "
        "else their fp32 ONNX graphs, and the grader's fp32 graph; /readyz says which per graph.",
    )
    threads: int | None = Field(
        default=None, ge=1,
        description="Inference threads per graph, ONNX Runtime's or OpenVINO's (None: the CPUs the process may use).",
    )
    faiss_threads: int = Field(
        default=1, ge=1,
        description="OpenMP threads of one FAISS search. 1: searches of concurrent requests run side by side and "
        "never wait for a thread the model holds (measured: IVF p50 0.40 ms with 1 thread, 0.69 ms with 2).",
    )
    ort_spinning: bool = Field(
        default=False,
        description="Let ONNX Runtime's threads spin between model runs. Off: they sleep and leave the cores to "
        "the event loop and the searches (measured, 16 clients on 2 cores: 183 vs 123 requests/s; one client: "
        "p50 10.0 vs 7.8 ms).",
    )
    api_key: SecretStr | None = Field(
        default=None, description="When set, every route but /healthz needs it (X-API-Key header or cookie)."
    )
    max_upload_mb: float = Field(default=20.0, gt=0, description="Largest accepted request body, in MB.")
    max_image_pixels: int = Field(default=60_000_000, ge=1, description="Larger images are refused (bombs).")
    max_text_chars: int = Field(default=20_000, ge=1, description="Longer texts are refused with 422.")
    max_aspect_ratio: float = Field(
        default=4.0, ge=1.0,
        description="An upload's longer side may be at most this many times its shorter (thin strips are refused).",
    )
    max_k: int = Field(default=100, ge=1, description="The largest `k` a search may ask for.")
    consensus_k: int = Field(
        default=10, ge=0, le=1000,
        description="The archived photographs nearest a query photograph whose ICDR grades form the `consensus` of "
        "/grade and /search/image (image->image, unfiltered); a request's `consensus_k` (at most max_k) overrides "
        "it. 0: no consensus unless a request asks for one.",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0,
        description="A request body must arrive whole within this many seconds (slow clients get 408).",
    )
    index_check_s: float = Field(
        default=2.0, ge=0,
        description="How often the index folder is checked for a new generation or changed files (0: never).",
    )
    batch_max: int = Field(default=16, ge=1, description="Most requests merged into one model run (1: no batching).")
    batch_wait_ms: float = Field(
        default=0.0, ge=0,
        description="How long a model run waits for more requests to join its batch. 0: none; requests that "
        "arrive while a batch runs form the next one (measured: 2 ms of waiting cost 2 ms of latency at one "
        "client and gained nothing at 16).",
    )
    gate: Literal["refuse", "report"] = Field(
        default="refuse",
        description="A photograph the bundle's gradability gate judges not a fundus photograph: refuse it (422 'not "
        "a fundus photograph') or report (answer, with `gradable.fundus` false). A request's `gate` field "
        "overrides it.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _api_key_is_not_blank(self) -> ServiceSettings:
        # env_ignore_empty turns RETINA_API_KEY="" into "no key": that must not silently switch off
        # authentication, so a set-but-blank key (variable or argument) is refused.
        from_env = os.environ.get("RETINA_API_KEY")
        given = self.api_key.get_secret_value() if self.api_key is not None else None
        if (given is not None and not given.strip()) or (from_env is not None and not from_env.strip()):
            raise ValueError(
                "RETINA_API_KEY is set but blank: set a key, or unset the variable to serve without one"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        """`max_upload_mb` in bytes."""
        return int(self.max_upload_mb * MEGABYTE)
