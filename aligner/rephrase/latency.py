"""The query-time cost of a rephrasing: the rephraser of a ``jobs.rephrase`` output, rebuilt in
this process and timed one query per call.

The evaluation's ``rephrase`` and ``teacher_rerank`` systems look up rephrasings precomputed by
``jobs.rephrase``; a deployed system pays the LLM call for every new query, so their ``ms/q``
includes it (docs/evaluation.md, section 6)::

    query_latency("out/rephrased", ["two red circles on grass", ...])
    # {'backend': 'local:smollm2-135m/detail.v2', 'measured': True, 'n': 12,
    #  'ms_per_query': 844.2, 'p90_ms': 1118.0, 'load_s': 1.3, 'threads': 1,
    #  'where': 'this machine, one query per call'}

The output's ``manifest.json`` (or ``config.yaml``) says which back end, model, prompt version
and settings produced the rephrasings; the same rephraser is built from them (the prompt pinned
to the recorded version; one no longer in this tree is replaced by the style's current version
and the answer's ``note`` says so; torch threads as the job's actors get them on this machine),
warmed up, then asked ``n`` times for one query each (the full row path: generation, the
faithfulness check and the template fallback). Back ends that call a server or a GPU engine
(``openai``, ``vllm``) are not measured here, nor is an output without a readable manifest: the
answer then says ``measured: False`` and why. Nothing here raises: the evaluation goes on
without the number.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: back ends that are not timed in-process (a remote server, a GPU engine)
UNMEASURED = {
    "openai": "an OpenAI-compatible server answers it: its latency is the server's and the "
              "network's, not this machine's",
    "vllm": "a vLLM GPU engine answers it (ray.data.llm batch inference): not rebuilt in the "
            "evaluating process",
}
WHERE = "this machine, one query per call"


def _output_dir(rephrased: str | Path) -> str | Path:
    """The ``jobs.rephrase`` output directory of ``rephrased`` (a directory or its
    ``queries.parquet``)."""
    from aligner.data.io import is_uri

    s = str(rephrased)
    if is_uri(s):
        s = s.rstrip("/")
        return s.rsplit("/", 1)[0] if s.endswith(".parquet") else s
    p = Path(rephrased)
    return p.parent if p.suffix == ".parquet" or p.is_file() else p


def read_rephrase_setup(rephrased: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, config) of a rephrase output; the config from the manifest, else
    ``config.yaml``.

    Raises:
        FileNotFoundError: neither ``manifest.json`` nor ``config.yaml`` is there.
        ValueError: they are unreadable or name no back end.
    """
    import json

    import yaml

    from aligner.data.io import join_path, read_text_at

    out = _output_dir(rephrased)
    text = read_text_at(join_path(out, "manifest.json"))
    manifest: dict[str, Any] = json.loads(text) if text else {}
    if not isinstance(manifest, dict):
        raise ValueError(f"{out}/manifest.json is not a JSON object")
    config = manifest.get("config")
    if not isinstance(config, dict):
        ytext = read_text_at(join_path(out, "config.yaml"))
        if ytext is None and not manifest:
            raise FileNotFoundError(f"no manifest.json or config.yaml in {out}: not a "
                                    "jobs.rephrase output")
        config = yaml.safe_load(ytext) if ytext else {}
    if not isinstance(config, dict):
        raise ValueError(f"{out}: the rephrase config is not a mapping")
    backend = manifest.get("backend") or config.get("backend")
    if not backend:
        raise ValueError(f"{out}: the manifest and config name no back end")
    return manifest, {**config, "backend": backend}


def _prompt_id(manifest: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The prompt version the rephrasings were made with (``detail.v1``), else the style."""
    return str(manifest.get("prompt") or config.get("style") or "detail")


def _sub(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    sub = config.get(name)
    return dict(sub) if isinstance(sub, Mapping) else {}


def expected_version(manifest: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The rephraser string of the output's rows (``local:smollm2-135m/detail.v1``).

    The most frequent version of the configured back end among the manifest's
    ``rephraser_versions`` (template fallbacks aside); without one (every row fell back, or an
    older manifest) the string the back end would write, from the config.
    """
    backend = str(config["backend"])
    counts = manifest.get("rephraser_versions")
    if isinstance(counts, Mapping):
        own = [(n, v) for v, n in counts.items() if str(v).startswith(backend + ":")]
        if own:
            return str(max(own)[1])
    prompt = _prompt_id(manifest, config)
    if backend == "template":
        from aligner.rephrase.template import TEMPLATE_VERSION

        style = prompt.partition(".")[0]
        return f"template:{config.get('polarity') or 'good'}/{style}.{TEMPLATE_VERSION}"
    if backend == "local":
        path = _sub(config, "local").get("model_path")
        model = "smollm2-135m" if not path else Path(str(path)).name.removesuffix(".gguf")
        return f"local:{model}/{prompt}"
    model = _sub(config, backend).get("model") or "?"
    return f"{backend}:{model}/{prompt}"


def job_threads(config: Mapping[str, Any], cpus: float | None = None) -> int:
    """The torch threads ``jobs.rephrase`` gives each local LLM actor on a machine with
    ``cpus`` CPUs (default: this one's): ``threads_per_actor``, else 1 (2 above 4 CPUs)."""
    import os

    from aligner.runtime.raycluster import plan_cpu_actors

    return plan_cpu_actors(cpus or os.cpu_count() or 1, int(config.get("num_actors") or 0),
                           int(config.get("threads_per_actor") or 0)).threads


def build_rephraser(manifest: Mapping[str, Any], config: Mapping[str, Any],
                    num_threads: int | None = None) -> Any:
    """The rephraser that made the output, as ``jobs.rephrase`` builds it (same back end,
    model, prompt version, decoding settings, length limit and strictness). A prompt version
    no longer in this tree is replaced by the style's current one (the caller compares
    versions and says so).

    Args:
        num_threads: the local LLM's torch threads (None: as the job's actors on this
            machine, :func:`job_threads`; 0: keep this process's setting).

    Raises:
        ValueError: a back end this module does not rebuild (see :data:`UNMEASURED`).
    """
    from aligner.rephrase.base import make_rephraser
    from aligner.rephrase.prompt import load_prompt
    from aligner.rephrase.template import TemplateRephraser

    backend = str(config["backend"])
    prompt = _prompt_id(manifest, config)
    try:
        load_prompt(prompt)
    except ValueError:  # that version is gone from this tree: the style's current one
        style = str(config.get("style") or prompt.partition(".")[0])
        log.warning("prompt %s is not in this tree: timing %s instead", prompt,
                    load_prompt(style).id)
        prompt = style
    max_chars = int(config.get("max_chars") or 0) or None
    if backend == "template":  # run.py: the prompt's style, else detail
        style = prompt.partition(".")[0]
        style = style if style in TemplateRephraser.STYLES else "detail"
        return make_rephraser("template", style=style,
                              polarity=str(config.get("polarity") or "good"), max_chars=max_chars)
    if backend == "local":  # run.py's _backend_kwargs, one query per call
        local = _sub(config, "local")
        kw = {k: local[k] for k in ("model_path", "max_new_tokens", "repetition_penalty",
                                    "temperature") if k in local}
        threads = job_threads(config) if num_threads is None else num_threads
        return make_rephraser("local", prompt=prompt, max_chars=max_chars,
                              strict=bool(config.get("strict", True)), batch_size=1,
                              num_threads=threads, **kw)
    raise ValueError(f"back end {backend!r} is not rebuilt in-process")


def query_latency(rephrased: str | Path, queries: Sequence[str], n: int = 12, warmup: int = 2,
                  num_threads: int | None = None) -> dict[str, Any]:
    """Time the rephraser of a ``jobs.rephrase`` output on this machine, one query per call.

    Args:
        rephrased: the rephrase output (directory, or its ``queries.parquet``).
        queries: query texts; the first ``n`` are timed (cycled when there are fewer), the
            warm-up calls use the ones after them.
        n: timed calls, one query each.
        warmup: untimed calls first (lazy initialisation, allocator, caches).
        num_threads: the local LLM's torch threads: None (default) as ``jobs.rephrase``'s
            actors on this machine (1, or 2 above 4 CPUs, or the job's ``threads_per_actor``;
            two threads decoded 4-10x slower than one on 2 busy cores); 0 keeps this
            process's setting. The process's setting is restored afterwards.

    Returns:
        Measured: ``{"backend", "measured": True, "n", "ms_per_query"`` (median), ``"p90_ms",
        "load_s"`` (building the rephraser: the model load), ``"threads", "where"}``.
        Not measured (``openai``, ``vllm``, no readable manifest, no queries, or a failure
        while building or timing): ``{"backend", "measured": False, "why"}``. Never raises.
    """
    import numpy as np

    try:
        manifest, config = read_rephrase_setup(rephrased)
    except Exception as e:  # noqa: BLE001 - the evaluation goes on without the number
        return {"backend": None, "measured": False,
                "why": f"no readable rephrase manifest: {type(e).__name__}: {e}"}
    backend = str(config["backend"])
    try:
        version = expected_version(manifest, config)
    except Exception:  # noqa: BLE001
        version = backend
    if backend in UNMEASURED:
        return {"backend": version, "measured": False, "why": UNMEASURED[backend]}
    texts = [str(q) for q in queries if q is not None and str(q).strip()]
    if not texts or n < 1:
        return {"backend": version, "measured": False, "why": "no queries to time"}
    torch_threads = None
    rephraser = None
    try:
        if backend == "local":  # the LLM sets torch's threads: put them back afterwards
            import torch

            torch_threads = torch.get_num_threads()
        t = time.perf_counter()
        rephraser = build_rephraser(manifest, config, num_threads=num_threads)
        load_s = time.perf_counter() - t
        threads = torch.get_num_threads() if torch_threads is not None else None
        for i in range(max(0, warmup)):
            rephraser.rephrase_rows([texts[(n + i) % len(texts)]])
        times = []
        for i in range(n):
            q = texts[i % len(texts)]
            t = time.perf_counter()
            rephraser.rephrase_rows([q])
            times.append(time.perf_counter() - t)
        ms = np.array(times) * 1000.0
        out: dict[str, Any] = {
            "backend": version, "measured": True, "n": n,
            "ms_per_query": round(float(np.median(ms)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "load_s": round(load_s, 3), "where": WHERE}
        if threads is not None:
            out["threads"] = threads
        if rephraser.version != version:
            out["note"] = (f"timed {rephraser.version} (what this tree builds); the output's "
                           f"rows say {version}")
        log.info("rephrase latency %s: %.1f ms/query (p90 %.1f, n=%d), load %.1f s", version,
                 out["ms_per_query"], out["p90_ms"], n, load_s)
        return out
    except Exception as e:  # noqa: BLE001 - e.g. the model wheel is missing here
        log.warning("rephrase latency of %s not measured: %s: %s", version, type(e).__name__, e)
        return {"backend": version, "measured": False,
                "why": f"could not rebuild or run it here: {type(e).__name__}: {e}"[:500]}
    finally:
        del rephraser
        gc.collect()
        if torch_threads is not None and torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
