"""vLLM on GPU workers: a Ray Data processor for batch jobs, and an in-process rephraser.

Needs the GPU stack (``vllm``, requirements-gpu.txt); nothing here imports vllm or ``ray.data.llm`` until a
function is called. The batch path is Ray's own plumbing::

    proc = build_vllm_processor(model_source="Qwen/Qwen2.5-1.5B-Instruct", prompt="detail")
    ds = proc(ds)                      # adds 'raw_output' (and '__inference_error__' rows)
    ds = ds.map_batches(finalise_batch, fn_kwargs=dict(version=..., style="detail"))

Rows whose inference failed carry ``__inference_error__`` (``should_continue_on_error``) and
fall back to the template in :func:`aligner.rephrase.pipeline.finalise_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aligner.rephrase.base import Failed, Rephraser, clean_output
from aligner.rephrase.prompt import PromptTemplate, load_prompt


def build_vllm_processor(model_source: str, prompt: str | PromptTemplate = "detail",
                         keep_columns: Sequence[str] = ("query_id", "query"),
                         engine_kwargs: dict[str, Any] | None = None, concurrency: int = 1,
                         batch_size: int = 64, max_tokens: int = 64, temperature: float = 0.0,
                         accelerator_type: str | None = None):
    """A ``ray.data.llm`` processor: rows with ``query`` in, ``raw_output`` + kept columns out.

    Args:
        model_source: HF model id or a local/cluster path vLLM can load.
        prompt: template style, id or file.
        keep_columns: input columns carried to the output.
        engine_kwargs: vLLM engine arguments (e.g. ``max_model_len``).
        concurrency: vLLM engine replicas (one GPU each by default).
        batch_size: rows per engine call.
        max_tokens, temperature: sampling parameters.
        accelerator_type: e.g. ``"H100"`` to pin the GPU kind.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    tpl = prompt if isinstance(prompt, PromptTemplate) else load_prompt(prompt)
    keep = tuple(keep_columns)
    kwargs: dict[str, Any] = {}
    if accelerator_type:
        kwargs["accelerator_type"] = accelerator_type
    config = vLLMEngineProcessorConfig(
        model_source=model_source, engine_kwargs={"max_model_len": 2048, **(engine_kwargs or {})},
        concurrency=concurrency, batch_size=batch_size, should_continue_on_error=True, **kwargs)
    sampling = {"temperature": temperature, "max_tokens": max_tokens}

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        return {"messages": tpl.messages(str(row["query"])), "sampling_params": sampling}

    def post(row: dict[str, Any]) -> dict[str, Any]:
        return {**{k: row[k] for k in keep if k in row},
                "raw_output": clean_output(row.get("generated_text"))}

    return build_processor(config, preprocess=pre, postprocess=post)


class VLLMRephraser(Rephraser):
    """In-process vLLM (one GPU) behind the :class:`Rephraser` interface (serving, notebooks).

    Args:
        model: HF model id or path.
        prompt: template style, id or file.
        temperature, max_tokens: sampling parameters.
        engine_kwargs: ``vllm.LLM`` arguments.
        max_chars, fallback, strict: see :class:`Rephraser`.
    """

    name = "vllm"

    def __init__(self, model: str, prompt: str | PromptTemplate = "detail",
                 temperature: float = 0.0, max_tokens: int = 64,
                 engine_kwargs: dict[str, Any] | None = None, max_chars: int | None = None,
                 fallback: Rephraser | None | str = "template", strict: bool = True) -> None:
        super().__init__(prompt, max_chars=max_chars, fallback=fallback, strict=strict)
        from vllm import LLM, SamplingParams

        self._model = model
        self.llm = LLM(model=model, **{"max_model_len": 2048, **(engine_kwargs or {})})
        self.sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens)

    @property
    def model(self) -> str:
        return self._model

    def generate(self, queries: Sequence[str]) -> list[str | Failed]:
        outs = self.llm.chat([self.prompt.messages(q) for q in queries], self.sampling,
                             use_tqdm=False)
        return [clean_output(o.outputs[0].text) if o.outputs else Failed("empty_output")
                for o in outs]
