"""An in-process transformers VLM (Llava-style: ``AutoProcessor`` +
``AutoModelForImageTextToText``) as a judge back end.

The choice is read from the model's next-token logits at the end of the prompt: the
log-softmax over the whole vocabulary, summed over the token ids a choice can start with
(``"A"`` and ``" A"``), so every request gets a probability per choice and there is nothing
to parse. With ``max_tokens > 1`` (a rationale) the answer is generated greedily and the
choice is still read from the first step's logits.

Requests are batched (``batch_size``; left padding) through the processor's chat template:
image parts become ``{"type": "image"}`` entries and the images go to the processor in order.
A batch that fails (an image the processor cannot take, a prompt longer than the model) gives
each of its requests an error reply with the reason; nothing raises.

On a cluster ``model_path`` is a real VLM's directory (e.g. ``llava-hf/llava-1.5-7b-hf``
saved locally); the tests build a tiny randomly initialised Llava and its processor in code
and pass them as ``model`` / ``processor``, so they run this same code path.
"""

from __future__ import annotations

import inspect
import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aligner.judge.backend import ChatReply, ChatRequest, VLMBackend
from aligner.judge.prompts import IMAGE_PART

log = logging.getLogger(__name__)


def hf_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """OpenAI-style messages -> (HF chat messages with ``{"type": "image"}`` parts and text
    content as part lists, the images' bytes in order)."""
    out, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = []
            for p in content or []:
                if p.get("type") == IMAGE_PART:
                    parts.append({"type": "image"})
                    images.append(p["image"])
                else:
                    parts.append({"type": "text", "text": str(p.get("text", ""))})
        out.append({"role": m["role"], "content": parts})
    return out, images


class TransformersVLM(VLMBackend):
    """A transformers image-text-to-text model in this process.

    Args:
        model_path: a local model directory (processor files included); ignored when
            ``model`` and ``processor`` are given.
        model: an already built model (tests: a tiny random Llava).
        processor: its processor (image processor + tokenizer + chat template).
        device: ``cpu``, ``cuda`` ... (``auto``: cuda when available).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (loading from ``model_path``).
        batch_size: requests per forward pass.
        num_threads: ``torch.set_num_threads`` (0: leave as is).
        name: the model's short name (default: the directory's or the class's name).
    """

    name = "transformers"

    def __init__(self, model_path: str | None = None, model: Any = None, processor: Any = None,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 8,
                 num_threads: int = 0, name: str = "") -> None:
        import torch

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        t = time.time()
        from_path = model is None or processor is None
        if from_path:
            if not model_path:
                raise ValueError("the transformers judge back end needs model_path (or a model "
                                 "and its processor)")
            if not Path(model_path).is_dir():
                raise FileNotFoundError(f"VLM directory {model_path} does not exist (a local "
                                        "directory with the model and its processor)")
            from transformers import AutoModelForImageTextToText, AutoProcessor

            processor = AutoProcessor.from_pretrained(model_path)
            model = AutoModelForImageTextToText.from_pretrained(
                model_path, dtype=getattr(torch, dtype))
        self.model_obj = model.to(device).eval()
        self.processor, self.device = processor, device
        self.tok = getattr(processor, "tokenizer", processor)
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.batch_size = max(1, batch_size)
        self._name = name or (Path(str(model_path)).name if from_path
                              else type(model).__name__)
        self._forward_args = set(inspect.signature(self.model_obj.forward).parameters)
        self._ids: dict[tuple[str, ...], dict[str, list[int]]] = {}
        self.load_s = time.time() - t
        self.stats = {"requests": 0, "batches": 0, "seconds": 0.0}

    @property
    def model(self) -> str:
        return self._name

    def choice_token_ids(self, choices: Sequence[str]) -> dict[str, list[int]]:
        """Per choice, the token ids its answer can start with (``"A"``, ``" A"``).

        Raises:
            ValueError: a choice with no token, or two choices sharing a first token.
        """
        key = tuple(choices)
        if key not in self._ids:
            out: dict[str, list[int]] = {}
            owner: dict[int, str] = {}
            for c in choices:
                ids = set()
                for variant in (c, " " + c):
                    enc = self.tok(variant, add_special_tokens=False).input_ids
                    if enc:
                        ids.add(int(enc[0]))
                if not ids:
                    raise ValueError(f"choice {c!r} has no token in this tokenizer")
                for i in ids:
                    if owner.get(i, c) != c:
                        raise ValueError(f"choices {owner[i]!r} and {c!r} start with the same "
                                         f"token {i}: pick distinguishable choices")
                    owner[i] = c
                out[c] = sorted(ids)
            self._ids[key] = out
        return self._ids[key]

    def _inputs(self, batch: Sequence[ChatRequest]) -> dict[str, Any]:
        from PIL import Image

        texts, images = [], []
        for req in batch:
            msgs, ims = hf_messages(req.messages)
            texts.append(self.processor.apply_chat_template(msgs, add_generation_prompt=True,
                                                            tokenize=False))
            images += [Image.open(io.BytesIO(b)).convert("RGB") for b in ims]
        enc = self.processor(text=texts, images=images or None, return_tensors="pt",
                             padding=True)
        return {k: v.to(self.device) for k, v in enc.items() if k in self._forward_args}

    def _batch(self, batch: Sequence[ChatRequest]) -> list[ChatReply]:
        import torch

        enc = self._inputs(batch)
        steps = max(r.max_tokens for r in batch)
        with torch.inference_mode():
            if steps <= 1:
                logits = self.model_obj(**enc).logits[:, -1]
                texts = [self.tok.decode([int(i)], skip_special_tokens=True)
                         for i in logits.argmax(-1)]
            else:
                g = self.model_obj.generate(**enc, max_new_tokens=steps, do_sample=False,
                                            output_logits=True, return_dict_in_generate=True,
                                            pad_token_id=self.tok.pad_token_id)
                logits = g.logits[0]
                new = g.sequences[:, enc["input_ids"].shape[1]:]
                texts = [self.tok.decode(row[:r.max_tokens], skip_special_tokens=True)
                         for row, r in zip(new, batch, strict=True)]
            logp = torch.log_softmax(logits.float(), -1)
        out = []
        for i, req in enumerate(batch):
            ids = self.choice_token_ids(req.choices)
            lps = {c: float(torch.logsumexp(logp[i, v], 0)) for c, v in ids.items()}
            out.append(ChatReply(texts[i].strip(), lps))
        return out

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        t = time.time()
        out: list[ChatReply] = []
        for lo in range(0, len(requests), self.batch_size):
            batch = requests[lo:lo + self.batch_size]
            try:
                out += self._batch(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch is reported per request
                log.warning("%s failed on a batch of %d: %s: %s", self._name, len(batch),
                            type(e).__name__, e)
                out += [ChatReply(error=f"model_error: {type(e).__name__}: {e}"[:300])
                        for _ in batch]
            self.stats["batches"] += 1
        self.stats["requests"] += len(requests)
        self.stats["seconds"] += time.time() - t
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self.device, "batch_size": self.batch_size,
                "load_s": round(self.load_s, 2)}
