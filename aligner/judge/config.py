"""The judge and annotation jobs' back-end options (nested config sections).

Each section is one back end's constructor arguments, so ``backend=openai`` with
``openai.base_url=... openai.model=...`` on the command line is all a job needs;
:func:`backend_options` turns the chosen section into keyword arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: fields that change how a back end is reached, not what it answers (left out of the
#: identity that decides whether an earlier output can be reused)
TRANSPORT_FIELDS = ("api_key_env", "timeout_s", "max_retries", "backoff_s", "max_concurrency",
                    "batch_size", "num_threads", "device", "num_gpus")


@dataclass
class OpenAIOptions:
    """The ``openai`` back end (any OpenAI-compatible chat-completions endpoint with images)."""

    base_url: str = field(default="", metadata={"help": "e.g. http://127.0.0.1:8000/v1"})
    model: str = field(default="", metadata={"help": "model name the server expects"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "env var holding the API key (never logged)"})
    timeout_s: float = field(default=60.0, metadata={"help": "per-request timeout"})
    max_retries: int = field(default=3, metadata={"help": "retries on errors/408/429/5xx"})
    backoff_s: float = field(default=0.5, metadata={"help": "first retry wait (doubles)"})
    max_concurrency: int = field(default=8, metadata={"help": "requests in flight per task"})
    logprobs: bool = field(default=True, metadata={
        "help": "ask for log-probabilities (false: parse the answer's text)"})
    top_logprobs: int = field(default=20, metadata={"help": "alternatives per position"})
    image_detail: str = field(default="", metadata={
        "help": "image_url detail: '' (left out) | low | high"})
    extra_body: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "more request fields (e.g. vLLM's guided_choice)"})


@dataclass
class TransformersOptions:
    """The ``transformers`` back end (an in-process Llava-style VLM)."""

    model_path: str = field(default="", metadata={
        "help": "local model dir with its processor (AutoProcessor + "
                "AutoModelForImageTextToText)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    batch_size: int = field(default=8, metadata={"help": "requests per forward pass"})
    num_threads: int = field(default=0, metadata={"help": "torch threads (0: as is)"})


@dataclass
class VLLMOptions:
    """The ``vllm`` back end (vLLM offline inference; needs the GPU stack, requirements-gpu.txt, and a GPU)."""

    model: str = field(default="", metadata={"help": "HF model id or local path for vLLM"})
    engine_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "vllm.LLM arguments (max_model_len, limit_mm_per_prompt ...)"})
    top_logprobs: int = field(default=20, metadata={"help": "log-probs per position"})
    num_gpus: float = field(default=1.0, metadata={"help": "GPUs per vLLM actor"})


def backend_options(cfg: Any, backend: str) -> dict[str, Any]:
    """The keyword arguments of a VLM back end from a config with ``openai``,
    ``transformers`` and ``vllm`` sections (``num_gpus`` is a Ray resource, not one)."""
    section = getattr(cfg, backend)
    opts = dataclasses.asdict(section)
    opts.pop("num_gpus", None)
    return opts


def check_backend(cfg: Any, backend: str) -> None:
    """Raise ValueError when the chosen VLM back end lacks what it needs."""
    if backend == "openai" and not (cfg.openai.base_url and cfg.openai.model):
        raise ValueError("backend=openai needs openai.base_url and openai.model")
    if backend == "transformers" and not cfg.transformers.model_path:
        raise ValueError("backend=transformers needs transformers.model_path (a local VLM dir)")
    if backend == "vllm" and not cfg.vllm.model:
        raise ValueError("backend=vllm needs vllm.model")


def identity_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options without the transport fields (:data:`TRANSPORT_FIELDS`)."""
    return {k: v for k, v in options.items() if k not in TRANSPORT_FIELDS}
