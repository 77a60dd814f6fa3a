"""Judge rows of corpus image ids with any judge: what the judge job and the serving
deployment share.

:func:`make_row_judge` builds one from a back-end name and plain options:

* ``proxy`` - :class:`~aligner.judge.proxy.ProxyJudge` (``proxy:scorer+similarity``) over a
  reference retriever (``options.checkpoint``) and an aesthetic scorer (``options.scorer``);
* ``proxy:reward`` - :class:`~aligner.judge.proxy.RewardProxyJudge` over a reward model
  (``options.path`` loaded with ``options.loader``'s ``load(path)``, default
  ``aligner.reward.model:RewardModel``; or an object with ``score`` passed as
  ``reward_model``), named ``proxy:reward:<options.name or the model's name>``;
* ``openai`` / ``transformers`` / ``vllm`` - :class:`~aligner.judge.lmm.LMMJudge` over that
  VLM back end (``options`` go to the back end).

:meth:`RowJudge.judge` fetches the rows' images from the corpus, judges every pair in both
orders and returns judgments-table rows (:mod:`aligner.data.judgments`). A pair whose images
cannot be fetched or decoded, or whose judge call fails, becomes a ``failed`` row with the
reason; identical rows are "similar" without a call (``decision=identical``).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aligner.data.io import json_safe
from aligner.judge.protocol import Judgment, order_consistent

log = logging.getLogger(__name__)

JUDGE_BACKENDS = ("proxy", "proxy:reward", "openai", "transformers", "vllm")
LMM_BACKENDS = ("openai", "transformers", "vllm")
DEFAULT_REWARD_LOADER = "aligner.reward.model:RewardModel"


@dataclass
class RowPair:
    """Two rows of one query to judge: row a (``ids_a``) and row b (``ids_b``), best first."""

    query_id: str
    query: str
    ids_a: list[str]
    ids_b: list[str]


def load_reward_model(path: str, loader: str = DEFAULT_REWARD_LOADER) -> Any:
    """A reward model: ``loader`` (``package.module:Class``) ``.load(path)``.

    Raises:
        ValueError: a loader that is not ``module:Class`` or has no ``load``.
        FileNotFoundError: from the loader, for a missing path.
    """
    if ":" not in loader:
        raise ValueError(f"reward loader {loader!r} is not package.module:Class")
    module, _, name = loader.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not callable(getattr(cls, "load", None)):
        raise ValueError(f"reward loader {loader} has no load(path)")
    return cls.load(path)


class RowJudge:
    """A judge of rows of corpus ids (see the module docstring).

    Args:
        judge: a :class:`~aligner.judge.lmm.LMMJudge`, :class:`~aligner.judge.proxy.ProxyJudge`
            or :class:`~aligner.judge.proxy.RewardProxyJudge`.
        fetch: ids -> ``{id: encoded bytes}`` (missing ids left out), e.g.
            ``functools.partial(aligner.data.corpus.fetch_images, corpus)``.
        viewer: the :class:`~aligner.judge.proxy.RowViewer` a scorer + similarity proxy reads.
        compose, thumb, cols: how an LMM is shown a row (:func:`aligner.judge.images.row_images`).
    """

    def __init__(self, judge: Any, fetch: Callable[[list[str]], Mapping[str, bytes]],
                 viewer: Any = None, compose: str = "row", thumb: int = 224,
                 cols: int = 5) -> None:
        from aligner.judge.images import COMPOSE

        if compose not in COMPOSE:
            raise ValueError(f"compose must be one of {list(COMPOSE)}, not {compose!r}")
        self.judge, self.fetch, self.viewer = judge, fetch, viewer
        self.compose, self.thumb, self.cols = compose, thumb, cols
        self.kind = ("lmm" if not getattr(judge, "proxy", True) else
                     "reward" if hasattr(judge, "mean_reward") else "scorer")
        if self.kind == "scorer" and viewer is None:
            raise ValueError("the scorer + similarity proxy needs a RowViewer")

    @property
    def name(self) -> str:
        return self.judge.name

    @property
    def style(self) -> str:
        return self.judge.style if self.kind == "lmm" else "proxy"

    @property
    def prompt_id(self) -> str:
        return self.judge.prompt.id if self.kind == "lmm" else ""

    def describe(self) -> dict[str, Any]:
        if self.kind == "lmm":
            return {**self.judge.describe(), "compose": self.compose, "thumb": self.thumb}
        return {"judge": self.name, "proxy": True, "style": "proxy"}

    def _row(self, pair: RowPair, **fields: Any) -> dict[str, Any]:
        return {"query_id": pair.query_id, "query": pair.query, "judge": self.name,
                "proxy": self.kind != "lmm", "style": self.style, "prompt": self.prompt_id,
                "ids_a": list(pair.ids_a), "ids_b": list(pair.ids_b), **fields}

    def _failed(self, pair: RowPair, reason: str) -> dict[str, Any]:
        return self._row(pair, status="failed", error=reason[:500])

    def _ok(self, pair: RowPair, j: Judgment, agree: bool, decision: str) -> dict[str, Any]:
        d = j.details
        return self._row(pair, status="ok", winner=j.winner, orders_agree=bool(agree),
                         first_winner=str(d.get("first_winner", j.winner)),
                         second_winner=str(d.get("second_winner", j.winner)),
                         decision=decision, rationale=j.rationale,
                         details=json.dumps(json_safe(d)), **j.aspects)

    def judge_pairs(self, pairs: Sequence[RowPair]) -> list[dict[str, Any]]:
        """Judgments-table rows (without ``system_a`` / ``system_b``), one per pair, in order."""
        from aligner.data.images import ImageError
        from aligner.judge.images import row_images
        from aligner.judge.lmm import ShownPair
        from aligner.judge.proxy import RewardRow

        wanted = list(dict.fromkeys(i for p in pairs for i in (*p.ids_a, *p.ids_b)))
        try:
            images = dict(self.fetch(wanted)) if wanted else {}
        except (OSError, ValueError) as e:
            return [self._failed(p, f"images: cannot read the corpus: {e}") for p in pairs]
        out: list[dict[str, Any] | None] = [None] * len(pairs)
        lmm_todo: list[tuple[int, ShownPair]] = []
        for k, p in enumerate(pairs):
            if not p.ids_a or not p.ids_b:
                out[k] = self._failed(p, "empty row: a system returned no images")
                continue
            missing = [i for i in (*p.ids_a, *p.ids_b) if i not in images]
            if missing:
                out[k] = self._failed(p, f"missing images: {missing[:5]}"
                                      f"{' ...' if len(missing) > 5 else ''}")
                continue
            if list(p.ids_a) == list(p.ids_b):
                same = Judgment("similar", {}, "identical rows", {})
                out[k] = self._ok(p, same, True, "identical")
                continue
            rows = [[images[i] for i in p.ids_a], [images[i] for i in p.ids_b]]
            try:
                if self.kind == "lmm":
                    shown = [row_images(r, self.compose, self.thumb, self.cols) for r in rows]
                    lmm_todo.append((k, ShownPair(p.query, shown[0], shown[1])))
                elif self.kind == "scorer":
                    va, vb = self.viewer.views(p.query, rows)
                    j, agree = order_consistent(self.judge, va, vb)
                    out[k] = self._ok(p, j, agree, "proxy")
                else:
                    ra, rb = RewardRow(p.query, rows[0]), RewardRow(p.query, rows[1])
                    self.judge.score_rows([ra, rb])  # one model call; both orders reuse it
                    j, agree = order_consistent(self.judge, ra, rb)
                    out[k] = self._ok(p, j, agree, "proxy")
            except ImageError as e:
                out[k] = self._failed(p, f"bad image: {e}")
            except (ValueError, RuntimeError) as e:
                out[k] = self._failed(p, f"judge_error: {type(e).__name__}: {e}")
        if lmm_todo:
            results = self.judge.judge_pairs([s for _, s in lmm_todo])
            for (k, _), res in zip(lmm_todo, results, strict=True):
                if isinstance(res, str):
                    out[k] = self._failed(pairs[k], res)
                else:
                    j, agree = res
                    out[k] = self._ok(pairs[k], j, agree, str(j.details.get("read", "")))
        return [r for r in out if r is not None]


def make_row_judge(backend: str, corpus: str = "", style: str = "ranker", prompt: str = "",
                   rationale: bool = False, rationale_tokens: int = 48,
                   score_margin: float = 0.25, compose: str = "row", thumb: int = 224,
                   cols: int = 5, options: Mapping[str, Any] | None = None,
                   fetch: Callable[[list[str]], Mapping[str, bytes]] | None = None,
                   reward_model: Any = None, retriever: Any = None) -> RowJudge:
    """Build a :class:`RowJudge` by back-end name (see the module docstring).

    Args:
        backend: one of :data:`JUDGE_BACKENDS`.
        corpus: where the images are (unless ``fetch`` is given).
        style, prompt: LMM judges: ``ranker`` | ``scorer``, and a prompt id or file ('' = the
            style's newest built-in prompt).
        options: the back end's options (``openai``: base_url, model ...; ``transformers``:
            model_path ...; ``proxy``: checkpoint, scorer, margins; ``proxy:reward``: path,
            loader, margin).
        reward_model, retriever: already loaded models (tests, serving) instead of paths.

    Raises:
        ValueError: an unknown back end or missing options.
        FileNotFoundError: a missing model.
    """
    from functools import partial

    opts = dict(options or {})
    if fetch is None:
        if not corpus:
            raise ValueError("a row judge needs a corpus (or a fetch function) for its images")
        from aligner.data.corpus import fetch_images

        fetch = partial(fetch_images, corpus)
    if backend == "proxy":
        from aligner.aesthetics.scorer import make_scorer
        from aligner.judge.proxy import ProxyJudge, RowViewer

        if retriever is None:
            from aligner.retrieval.models import ModelSpec, load_retriever

            if not opts.get("checkpoint"):
                raise ValueError("the proxy judge needs options.checkpoint: the reference "
                                 "retriever whose similarity judges accuracy")
            retriever = load_retriever(ModelSpec(checkpoint=str(opts["checkpoint"])),
                                       device=str(opts.get("device") or "cpu"))
        judge = ProxyJudge(**{k: float(opts[k]) for k in ("accuracy_margin", "aesthetic_margin",
                                                          "diversity_margin") if k in opts})
        viewer = RowViewer(retriever, make_scorer(str(opts.get("scorer") or "lowlevel")))
        return RowJudge(judge, fetch, viewer)
    if backend == "proxy:reward":
        from aligner.judge.proxy import RewardProxyJudge

        if reward_model is None:
            if not opts.get("path"):
                raise ValueError("the reward proxy needs options.path: the reward model")
            reward_model = load_reward_model(str(opts["path"]),
                                             str(opts.get("loader") or DEFAULT_REWARD_LOADER))
        label = str(opts.get("name") or getattr(reward_model, "name", "") or "")
        label = label.removeprefix("reward:")
        name = "proxy:reward" + (f":{label}" if label else "")
        judge = RewardProxyJudge(reward_model, float(opts.get("margin", 0.05)), name)
        return RowJudge(judge, fetch)
    if backend in LMM_BACKENDS:
        from aligner.judge.backend import make_backend
        from aligner.judge.lmm import LMMJudge

        if style not in ("ranker", "scorer"):
            raise ValueError(f"style must be ranker or scorer, not {style!r}")
        judge = LMMJudge(make_backend(backend, **opts), prompt or style, rationale,
                         rationale_tokens, score_margin)
        if judge.style != style:
            raise ValueError(f"prompt {judge.prompt.id} is a {judge.style} prompt, not {style}")
        return RowJudge(judge, fetch, compose=compose, thumb=thumb, cols=cols)
    raise ValueError(f"unknown judge back end {backend!r}: one of {list(JUDGE_BACKENDS)}")
