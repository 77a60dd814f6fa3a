"""The model deployments: one per model, each a thin wrapper over library code.

* :class:`Retriever` - a query encoder (text and image, each batched with ``@serve.batch``)
  and its faiss indexes (:class:`aligner.retrieval.service.SearchService`); one deployment per
  model (``retriever_base``, ``retriever_aligned`` ...).
* :class:`IndexShard` - some shards of one sharded index (``shard_<model>_<index>_<g>``,
  with ``shard_groups`` > 1): the retriever fans each query out to every group and merges the
  top k exactly (:class:`aligner.retrieval.index.RemoteShardsIndex`).
* :class:`Reranker` - the cascade re-ranker over retrieved candidates: ``z(sim) + w
  z(aesthetic)`` in the top N (the aesthetic scorer now; a learned reward model later).
* :class:`Rephraser` - the rephrase back ends (template, local LLM, OpenAI-compatible
  endpoint, vLLM), batched.
* :class:`Judge` - pairwise judging of two rows, order-consistent: the scorer + similarity
  proxy (default), a reward-model proxy, or an LMM (OpenAI-compatible endpoint, in-process
  transformers VLM, vLLM); a proxy is named as such (:mod:`aligner.judge`).

Expected failures (a bad image, an unknown index) come back as ``{"error": {"status": ...,
"detail": ...}}`` rather than as exceptions, so the ingress answers 4xx with a readable message.
Every step records its time in the ``aligner_step_ms`` histogram (tag ``step``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from serving.retriever_core import RetrieverCore, Timed, error, step_histogram

log = logging.getLogger("serving")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  health_check_period_s=10)
class Retriever(RetrieverCore):
    """One model and its indexes (see the module docstring and
    :class:`serving.retriever_core.RetrieverCore`), batched.

    Args:
        name: the model's name in the API (``base``, ``aligned``).
        model: :class:`serving.config.ModelArgs` as a dict.
        max_image_pixels: bigger query images are refused.
        shards: index name -> the handles of its shard-group deployments.
        speed: :class:`serving.config.SpeedArgs` as a dict (query cache, batch wait, threads).
    """

    def __init__(self, name: str, model: dict[str, Any], max_image_pixels: int,
                 shards: dict[str, list[Any]] | None = None,
                 speed: dict[str, Any] | None = None) -> None:
        from aligner.retrieval.index import RemoteShardsIndex

        remote = {index: RemoteShardsIndex.open(model["indexes"][index], fan_out(handles),
                                                mmap=model.get("mmap", False))
                  for index, handles in (shards or {}).items()}
        super().__init__(name, model, max_image_pixels, remote, speed)
        wait_s = float((speed or {}).get("batch_wait_ms", 0.0)) / 1000
        self._text_queries.set_batch_wait_timeout_s(wait_s)
        self._encode_texts.set_batch_wait_timeout_s(wait_s)

    def check_health(self) -> None:
        """Unhealthy (the replica is replaced) when an index lost its vectors (shard groups
        have their own health checks)."""
        for name, index in self.service.indexes.items():
            if not index.shards:
                continue
            if index.ntotal <= 0:
                raise RuntimeError(f"index {name} holds no vectors")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        with Timed(self.hist, "encode_text"):
            return list(await asyncio.to_thread(self.encode_cached, texts))

    async def encode_text(self, text: str) -> list[float]:
        """One query text -> its normalised vector (batched with concurrent requests)."""
        return (await self._encode_texts(text)).tolist()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _encode_images(self, blobs: list[bytes]) -> list[Any]:
        from aligner.data.images import ImageError

        def one(b: bytes) -> Any:
            try:  # decode one by one: a bad image must not fail its batch neighbours
                return self.service.encode_images([b])[0]
            except ImageError as e:
                return error(400, f"image: {e}")

        with Timed(self.hist, "encode_image"):
            return await asyncio.to_thread(lambda: [one(b) for b in blobs])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _text_queries(self, items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Text searches, batched: one forward pass for every text, then each one's search,
        all in one worker thread (the common case costs one call into this replica)."""
        return await asyncio.to_thread(self.text_queries, items)

    async def query(self, text: str | None = None, image: bytes | None = None,
                    embedding: list[float] | None = None, text_weight: float = 1.0,
                    image_weight: float = 1.0, k: int = 10, index: str | None = None,
                    aesthetic_weight: float = 0.0, dedup_threshold: float | None = None,
                    page: tuple[int, int] | None = None, nprobe: int | None = None,
                    k_factor: float | None = None) -> dict[str, Any]:
        """Encode a query (text, encoded image bytes, both weighted, or a raw embedding) and
        search it: ids, scores and aesthetics of the top ``k``, the rows (caption ...) of
        ``page = (offset, size)`` and timings; or an error value (a bad image 400, an unknown
        index 400, a wrong embedding size or a zero query 422). ``nprobe`` and ``k_factor``
        apply to this search only (None: the model's settings)."""
        kw = {"k": k, "index": index, "aesthetic_weight": aesthetic_weight,
              "dedup_threshold": dedup_threshold, "page": page, "nprobe": nprobe,
              "k_factor": k_factor}
        if text and image is None and embedding is None and text_weight > 0:
            return await self._text_queries((text, kw))
        t0 = time.perf_counter()
        tvec = await self._encode_texts(text) if text else None
        ivec = await self._encode_images(image) if image is not None else None
        if isinstance(ivec, dict):
            return ivec
        encode_ms = 1000 * (time.perf_counter() - t0)
        try:
            q = self.service.query_vector(tvec, ivec, embedding, text_weight, image_weight)
        except ValueError as e:
            return error(422, str(e))
        out = await asyncio.to_thread(self.search_now, q, **kw)
        if "timings_ms" in out:
            out["timings_ms"]["encode"] = encode_ms
        return out

    async def metadata(self, ids: list[str], index: str | None = None) -> Any:
        """Rows for ids (None for an unknown id), or an error value."""
        return await asyncio.to_thread(super().metadata, ids, index)

    async def view(self, query: list[float], ids: list[str], index: str | None = None) -> Any:
        """What a judge sees of a row (see :meth:`RetrieverCore.view`)."""
        return super().view(query, ids, index)


def fan_out(handles: list[Any]) -> Any:
    """A :class:`aligner.retrieval.index.RemoteShardsIndex` fan-out over shard deployments:
    every group is asked at once, then each answer is awaited. It blocks, so it runs in the
    retriever's worker thread (``_search_now``), never on the replica's event loop."""

    def call(queries: np.ndarray, k: int, params: dict[str, Any]) -> list[tuple[Any, Any]]:
        pending = [h.search.remote(queries, k, params) for h in handles]
        return [(r["scores"], r["positions"]) for r in (p.result() for p in pending)]

    return call


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  health_check_period_s=10)
class IndexShard:
    """Some shards of one index (``shard_numbers`` of its manifest), searched for the
    retriever that fans queries out to every group; the answer is positions (rows of the
    index's ``ids.parquet``) and scores, merged by the retriever.

    Memory per replica: the vectors of its shards (about ``N x bytes per vector / G`` for G
    equal groups) plus the index's id table (memory-mapped with ``mmap``).
    """

    def __init__(self, path: str, shard_numbers: list[int], mmap: bool = False,
                 nprobe: int | None = None, ef_search: int | None = None,
                 k_factor: float | None = None) -> None:
        from aligner.retrieval.index import SearchIndex

        self.index = SearchIndex.load(path, mmap=mmap, shards=shard_numbers, nprobe=nprobe,
                                      ef_search=ef_search, k_factor=k_factor)
        self.shard_numbers = list(shard_numbers)

    def check_health(self) -> None:
        """Unhealthy (the replica is replaced) when its shards lost their vectors."""
        if self.index.ntotal <= 0:
            raise RuntimeError(f"shards {self.shard_numbers} hold no vectors")

    async def search(self, queries: np.ndarray, k: int,
                     params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """``{"scores": [B, k], "positions": [B, k]}`` of this group's shards (``params``:
        nprobe, ef_search, k_factor for this search only)."""
        r = await asyncio.to_thread(self.index.search, queries, k, **(params or {}))
        return {"scores": r.scores, "positions": r.positions}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class Reranker:
    """The cascade re-ranker: ``z(sim) + weight * z(aesthetic)`` within the top ``n``; with a
    reward model, a text query's aesthetic is the reward of (query, image)
    (:class:`aligner.reward.rerank.RewardReranker`), other queries keep the stored score."""

    def __init__(self, n: int = 50, weight: float = 1.0, scorer: str = "lowlevel",
                 reward_model: str = "", reward_embeddings: str = "") -> None:
        self.n, self.weight, self.scorer = n, weight, scorer
        self.reward = None
        if reward_model:
            from aligner.reward.rerank import RewardReranker

            self.reward = RewardReranker(reward_model, reward_embeddings)
        self.hist = step_histogram()

    def describe(self) -> dict[str, Any]:
        out = {"kind": "cascade", "scorer": self.scorer, "n": self.n, "weight": self.weight}
        if self.reward is not None:
            out.update(kind="reward", reward_model=self.reward.name,
                       note="text queries: the reward model; others: the stored scorer")
        return out

    def check_health(self) -> None:
        """Re-ranks a fixed probe (pure numpy: fails only if the replica is broken)."""
        from aligner.evaluation.systems import cascade_scores

        if not np.isfinite(cascade_scores(np.ones((1, 2)), np.zeros((1, 2)), 1.0)).all():
            raise RuntimeError("the re-ranker returned non-finite scores")

    async def rerank(self, scores: list[float], aesthetic: list[float | None],
                     weight: float | None = None, text: str | None = None,
                     ids: list[str] | None = None) -> dict[str, Any]:
        """``{"order": [...], "scores": [...], "by": ...}``: the new order of the candidates
        (indices into ``scores``; the top ``n`` re-ranked, the rest after them unchanged), each
        one's final score in that order (the tail keeps its similarity), and what scored the
        aesthetics (``reward`` or ``scorer``)."""
        from aligner.evaluation.systems import cascade_scores

        with Timed(self.hist, "rerank"):
            n = min(self.n, len(scores))
            sim = np.asarray(scores[:n], np.float64)[None, :]
            by = "scorer"
            if self.reward is not None and text and ids is not None:
                aes = self.reward.rewards(text, list(ids[:n]))[None, :]
                by = "reward"
            else:
                aes = np.asarray([np.nan if a is None else a for a in aesthetic[:n]],
                                 np.float64)[None, :]
            final = cascade_scores(sim, aes, self.weight if weight is None else weight)[0]
            head = np.argsort(-final, kind="stable").tolist()
            return {"order": head + list(range(n, len(scores))),
                    "scores": [float(final[i]) for i in head] + list(scores[n:]), "by": by}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Rephraser:
    """An LLM (or rule) rephraser with explicit aesthetic expectations; faithful or it falls
    back to the template (:mod:`aligner.rephrase`)."""

    def __init__(self, backend: str = "template", style: str = "detail",
                 options: dict[str, Any] | None = None) -> None:
        from aligner.rephrase import make_rephraser

        kw = dict(options or {})
        kw.setdefault("prompt", style)
        self.rephraser = make_rephraser(backend, **kw)
        self.backend = backend
        self.hist = step_histogram()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, **self.rephraser.describe()}

    def check_health(self) -> None:
        """The rephraser is loaded (a remote LLM that is down degrades searches, not health:
        its rows fall back to the template)."""
        if self.rephraser is None:
            raise RuntimeError("no rephraser loaded")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _rephrase(self, queries: list[str]) -> list[dict[str, Any]]:
        with Timed(self.hist, "rephrase"):
            rows = await asyncio.to_thread(self.rephraser.rephrase_rows, queries)
        return [{"text": r.text, "rephraser": r.rephraser, "fallback": bool(r.fallback),
                 "reason": r.reason} for r in rows]

    async def rephrase(self, query: str) -> dict[str, Any]:
        """``{text, rephraser, fallback, reason}`` for one query."""
        return await self._rephrase(query)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
class Judge:
    """Order-consistent pairwise judge of two rows (:mod:`aligner.judge`).

    ``kind="proxy"`` (the default) judges with the scorer + similarity proxy over the
    reference model's retriever deployment (its similarities and index vectors); any other
    kind (``proxy:reward``, ``openai``, ``transformers``, ``vllm``) reads the rows' images from
    the corpus and judges them with :class:`aligner.judge.rows.RowJudge`.

    Args:
        retriever: the reference model's retriever deployment (the default proxy).
        margin: the proxy's accuracy margin.
        kind: the back end (:class:`serving.config.JudgeArgs`).
        corpus: where the images are (every kind but the default proxy).
        settings: style, prompt, rationale, compose, thumb and the back end's options.
    """

    def __init__(self, retriever: Any, margin: float = 0.02, kind: str = "proxy",
                 corpus: str = "", settings: dict[str, Any] | None = None) -> None:
        self.retriever, self.kind = retriever, kind
        self.judge: Any = None
        self.rows: Any = None
        if kind == "proxy":
            from aligner.judge.proxy import ProxyJudge

            self.judge = ProxyJudge(accuracy_margin=margin)
        else:
            from aligner.judge.rows import make_row_judge

            s = dict(settings or {})
            self.rows = make_row_judge(kind, corpus=corpus, style=s.get("style", "ranker"),
                                       prompt=s.get("prompt", ""),
                                       rationale=bool(s.get("rationale", False)),
                                       compose=s.get("compose", "row"),
                                       thumb=int(s.get("thumb", 224)),
                                       options=s.get("options") or {})
            self.judge = self.rows.judge
        self.hist = step_histogram()

    def describe(self) -> dict[str, Any]:
        if self.rows is not None:
            return {"judge": self.judge.name, **self.rows.describe()}
        return {"judge": self.judge.name, "proxy": True}

    def check_health(self) -> None:
        """The judge is loaded (its retriever has its own health check)."""
        if self.judge is None or (self.rows is None and self.retriever is None):
            raise RuntimeError("the judge is not ready")

    async def compare(self, text: str, left: list[str], right: list[str]) -> dict[str, Any]:
        """Which row is better for the query: ``{judge, winner, aspects, orders_agree,
        rationale}`` (winner left / right / similar), or an error value."""
        names = {"a": "left", "b": "right", "similar": "similar"}
        if self.rows is not None:
            return await self._compare_rows(text, left, right, names)
        from aligner.judge.protocol import order_consistent
        from aligner.judge.proxy import RowView

        with Timed(self.hist, "judge"):
            q = await self.retriever.encode_text.remote(text)
            views = await asyncio.gather(self.retriever.view.remote(q, left),
                                         self.retriever.view.remote(q, right))
            for v in views:
                if "error" in v:
                    return v
            rows = [RowView(np.asarray(v["similarity"]), np.asarray(v["aesthetic"]),
                            np.asarray(v["vectors"])) for v in views]
            j, agree = order_consistent(self.judge, rows[0], rows[1])
        return {"judge": self.judge.name, "winner": names[j.winner],
                "aspects": {k: names[v] for k, v in j.aspects.items()},
                "orders_agree": agree, "rationale": j.rationale}

    async def _compare_rows(self, text: str, left: list[str], right: list[str],
                            names: dict[str, str]) -> dict[str, Any]:
        from aligner.judge.rows import RowPair

        with Timed(self.hist, "judge"):
            [r] = await asyncio.to_thread(self.rows.judge_pairs,
                                          [RowPair("", text, list(left), list(right))])
        if r["status"] != "ok":
            missing = r["error"].startswith(("missing images", "empty row"))
            return error(400 if missing else 502, f"{self.judge.name}: {r['error']}")
        aspects = {k: names[r[k]] for k in ("accuracy", "aesthetics", "diversity") if r.get(k)}
        return {"judge": self.judge.name, "winner": names[r["winner"]], "aspects": aspects,
                "orders_agree": bool(r["orders_agree"]), "rationale": r.get("rationale", "")}
