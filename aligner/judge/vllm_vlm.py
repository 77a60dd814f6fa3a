"""vLLM offline inference as a judge back end (GPU; the optional ``gpu`` extra).

``vllm`` is imported when the back end is built, never at module import. Requests go through
``LLM.chat`` (images as data URLs, which vLLM decodes itself) with one
``SamplingParams(temperature=0, max_tokens=..., logprobs=top_logprobs)`` per request; the
choice is read from the first generated position's top log-probabilities (a choice outside
them counts as absent; with none present the text is parsed). In a Ray Data job the back end
lives in an actor that holds one GPU (``num_gpus=1``), loaded once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aligner.judge.backend import ChatReply, ChatRequest, VLMBackend, choice_logprobs_from_top
from aligner.judge.openai_vlm import openai_messages

log = logging.getLogger(__name__)


class VLLMVLM(VLMBackend):
    """A VLM on vLLM in this process.

    Args:
        model: HF model id or local path vLLM can load.
        engine_kwargs: ``vllm.LLM`` arguments (defaults: ``max_model_len`` 4096,
            ``limit_mm_per_prompt`` {"image": 16}).
        top_logprobs: log-probabilities returned per position (the choice must be among them).
        llm: an already built ``vllm.LLM`` (reuse one engine).
    """

    name = "vllm"

    def __init__(self, model: str, engine_kwargs: dict[str, Any] | None = None,
                 top_logprobs: int = 20, llm: Any = None) -> None:
        if not model:
            raise ValueError("the vllm judge back end needs model")
        from vllm import LLM, SamplingParams

        self._model, self.top_logprobs = model, max(1, top_logprobs)
        self._sampling = SamplingParams
        self.llm = llm or LLM(model=model, **{"max_model_len": 4096,
                                              "limit_mm_per_prompt": {"image": 16},
                                              **(engine_kwargs or {})})
        self.tokenizer = self.llm.get_tokenizer()

    @property
    def model(self) -> str:
        return self._model

    def _reply(self, out: Any, req: ChatRequest) -> ChatReply:
        if not out.outputs:
            return ChatReply(error="model_error: vLLM returned no output")
        o = out.outputs[0]
        first = (o.logprobs or [None])[0]
        if not first:
            return ChatReply(o.text, None)
        top = [(lp.decoded_token if lp.decoded_token is not None
                else self.tokenizer.decode([tid]), lp.logprob) for tid, lp in first.items()]
        return ChatReply(o.text, choice_logprobs_from_top(top, req.choices))

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        if not requests:
            return []
        params = [self._sampling(temperature=0.0, max_tokens=r.max_tokens,
                                 logprobs=self.top_logprobs) for r in requests]
        try:
            outs = self.llm.chat([openai_messages(r.messages) for r in requests], params,
                                 use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - a failed batch is reported per request
            log.warning("vLLM failed on a batch of %d: %s: %s", len(requests),
                        type(e).__name__, e)
            return [ChatReply(error=f"model_error: {type(e).__name__}: {e}"[:300])
                    for _ in requests]
        return [self._reply(o, r) for o, r in zip(outs, requests, strict=True)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "top_logprobs": self.top_logprobs}
