"""Search an index with text: print the ranked results and write an image grid.

    python -m jobs.search --config jobs/configs/search.yaml index=out/index query="two red circles on grass" k=10

``query`` may be a list (``query='["a cat", "a dog"]'``). The query encoder defaults to the
model recorded in the index manifest (the one that embedded the corpus) and the images come
from the corpus recorded there; ``index`` may be an ``s3://`` / ``gs://`` URI (loaded from a
local cached copy: ``aligner.retrieval.index_store``); ``model.name=ViT-B-32 model.pretrained=...`` /
``model.checkpoint=DIR`` and ``corpus=`` override them. Writes
``search.png`` (one row of results per query) and ``search.html`` (self-contained) to
``output``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import save_config, to_dict
from aligner.runtime.job import job_main
from aligner.runtime.manifest import write_manifest

DEFAULT_YAML = Path(__file__).parent / "configs" / "search.yaml"


@dataclass
class SearchConfig:
    """Text-to-image search over a faiss index."""

    index: str = field(default="out/index", metadata={
        "help": "index directory (jobs.build_index): local path, or s3://, gs:// URI (downloaded "
                "into a local cache, $ALIGNER_CACHE/index)"})
    # str first: one query containing a comma must stay one query (a bare list[str] splits
    # "a cat, sleeping" into two); a YAML list ('["a cat", "a dog"]') is still a list
    query: str | list[str] = field(default_factory=list, metadata={"help": "query text(s)"})
    k: int = field(default=10, metadata={"help": "results per query"})
    model: ModelSpec | None = field(default=None, metadata={
        "help": "query encoder (model.name / model.pretrained / model.checkpoint); unset = the "
                "model that embedded the corpus, from the index manifest"})
    corpus: str = field(default="", metadata={"help": "corpus for the images ('' = from manifest)"})
    output: str = field(default="out/search", metadata={"help": "where search.png/html go"})
    nprobe: int = field(default=0, metadata={"help": "IVF lists to visit (0: the index's)"})
    ef_search: int = field(default=0, metadata={"help": "HNSW breadth (0: the index's)"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be >= 1")


def run(cfg: SearchConfig) -> dict[str, Path]:
    """Search, print the ranked results, write ``search.png``, ``search.html``,
    ``results.json``, the config and the manifest; returns the PNG and HTML paths.

    Raises:
        FileNotFoundError: a missing index.
        ValueError: no query, or a query model that does not fit the index.
    """
    from aligner.retrieval.search import Searcher, hits_to_items
    from aligner.runtime.grids import image_grid_html, rows_grid_png

    started = time.time()
    queries = [q for q in ([cfg.query] if isinstance(cfg.query, str) else cfg.query)
               if q and q.strip()]
    if not queries:
        raise ValueError("no query given: pass query=\"some text\"")
    searcher = Searcher.open(cfg.index, cfg.model, cfg.corpus or None, cfg.nprobe or None,
                             cfg.ef_search or None)
    results = searcher.search(queries, cfg.k)
    rows = []
    for q, hits in zip(queries, results, strict=True):
        print(f"\nquery: {q}")
        print(f"{'rank':>4}  {'id':<24} {'score':>6} {'aesth':>6}  caption")
        for h in hits:
            aest = f"{h.aesthetic:6.2f}" if h.aesthetic is not None else "   n/a"
            print(f"{h.rank:>4}  {h.id:<24} {h.score:6.3f} {aest}  {h.caption[:90]}")
        rows.append((q, hits_to_items(hits, searcher.images(hits))))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    png = rows_grid_png(rows, out / "search.png", title=f"top {cfg.k} from {cfg.index}")
    html = image_grid_html(rows, out / "search.html", title=f"top {cfg.k} from {cfg.index}")
    (out / "results.json").write_text(json.dumps(
        {q: [h.__dict__ for h in hits] for q, hits in zip(queries, results, strict=True)},
        indent=1))
    save_config(cfg, out / "config.yaml")
    write_manifest(out, "search", to_dict(cfg), started, model=searcher.retriever.describe(),
                   corpus=searcher.corpus, outputs={"png": png.name, "html": html.name,
                                                    "results": "results.json"})
    return {"png": png, "html": html}


def main(argv: list[str] | None = None) -> int:
    return job_main(SearchConfig, argv, DEFAULT_YAML, run,
                    lambda cfg, paths: f"\ngrid: {paths['png']}\npage: {paths['html']}",
                    "python -m jobs.search")


if __name__ == "__main__":
    raise SystemExit(main())
