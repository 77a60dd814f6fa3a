"""Generate the built-in aesthetic world: corpus, held-out queries and the hidden oracle.

Layout of a world directory::

    corpus/part-00000.parquet ...   id, image (PNG bytes), caption, split    <- what systems see
    queries/queries.parquet         query_id, query, split, kind            <- what systems see
    galleries.parquet               id, split of the gallery images         <- what systems see
    eval/oracle.parquet             id, beauty, content labels, look factors, rendered_for
                                                                            <- evaluation only
    eval/query_truth.parquet        query_id, shape, colour, count, background, look
    eval/taste.json                 the hidden human's taste (aligner.world.taste)
    manifest.json

The oracle lives apart from the corpus: only evaluation may read ``eval/``. Same seed and
size, same world (byte for byte), whatever the number of worker processes.

**Dense galleries** (docs/evaluation.md, section 1): after the ``n_images`` natural images,
images are rendered for each val and test content query until its split holds at least
``gallery_relevant`` images with the asked-for content (:func:`plan_galleries`). They get the
ids after the natural ones in a seeded order that hides the query groups; that an image is a
gallery image is public (``galleries.parquet``), which query it was rendered for is not
(``rendered_for`` in the oracle). The natural images are the same whatever
``gallery_relevant`` is, and nothing that trains or votes reads a gallery image.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aligner.data.corpus import CORPUS_SCHEMA, read_corpus, write_corpus
from aligner.data.queries import QUERIES_FILE, read_queries, write_queries
from aligner.world.captions import compose, content_phrase, heldout_look_phrases
from aligner.world.render import (
    Content,
    Factors,
    encode_png,
    oracle_beauty,
    render,
    sample_factors,
)
from aligner.world.taste import DEFAULT_TASTE, Taste, read_taste, resolve_taste, write_taste
from aligner.world.vocab import BACKGROUNDS, COLOURS, COUNTS, FACTORS, SHAPES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GALLERY_SPLITS = ("val", "test")
GALLERIES_FILE = "galleries.parquet"
GALLERIES_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string())])
CONTENT_KEYS = ("shape", "colour", "count", "background")


@dataclass
class WorldSpec:
    """Size and seed of a world: same spec, same world (``jobs.make_world`` extends it)."""

    n_images: int = field(default=10_000, metadata={"help": "number of images"})
    image_size: int = field(default=64, metadata={"help": "image side in pixels"})
    seed: int = field(default=0, metadata={"help": "same seed, same world"})
    val_fraction: float = field(default=0.05, metadata={"help": "validation share of images"})
    test_fraction: float = field(default=0.15, metadata={"help": "test share of images"})
    n_queries: int = field(default=600, metadata={"help": "content queries (60/10/30 split)"})
    n_paraphrases: int = field(default=120, metadata={"help": "held-out-word test queries"})
    p_look: float = field(default=0.8, metadata={"help": "share of captions with look phrases"})
    rows_per_file: int = field(default=2_000, metadata={"help": "corpus rows per Parquet file"})
    gallery_relevant: int = field(default=20, metadata={
        "help": "val/test galleries: images rendered per val and test content query until its "
                "split holds at least this many images with the asked-for content (0: none)"})
    taste: str = field(default="default", metadata={
        "help": "the hidden human's taste: default | divergent (low-key light and off-centre "
                "framing) | a JSON file (aligner.world.taste); recorded only in eval/taste.json. "
                "Same seed, other taste: the same images and splits, other beauty, captions "
                "that stress other true things"})

    def __post_init__(self) -> None:
        if self.n_images < 10:
            raise ValueError("n_images must be at least 10")
        if not 16 <= self.image_size <= 512:
            raise ValueError("image_size must be in [16, 512]")
        if not 0 <= self.val_fraction + self.test_fraction < 1:
            raise ValueError("val_fraction + test_fraction must be in [0, 1)")
        if not 0.0 <= self.p_look <= 1.0:
            raise ValueError("p_look must be in [0, 1]")
        if self.rows_per_file < 1:
            raise ValueError("rows_per_file must be >= 1")
        if self.gallery_relevant < 0:
            raise ValueError("gallery_relevant must be >= 0")
        resolve_taste(self.taste)

    def spec(self) -> WorldSpec:
        """This spec alone (a subclass's extra fields, such as a job's output, dropped)."""
        return WorldSpec(**{f.name: getattr(self, f.name) for f in fields(WorldSpec)})


def image_record(seed: int, index: int, size: int, p_look: float,
                 content: Content | None = None, taste: Taste = DEFAULT_TASTE) -> dict:
    """Everything about image ``index``: factors, beauty, caption, PNG. Pure in (seed, index,
    taste); the factors and pixels do not depend on the taste.

    Args:
        seed: the world's seed.
        index: the image's index (its id is :func:`image_id`).
        size: image side in pixels.
        p_look: share of captions with look phrases.
        content: a gallery image's content (drawn from a generator of its own, so that it
            never repeats a natural image's looks); None: a natural image, content drawn.
        taste: the world's hidden taste (beauty, and which true things the caption says).
    """
    from aligner.world.captions import make_caption

    if content is None:
        rng = np.random.default_rng([seed, 1, index])
    else:
        rng = np.random.default_rng([seed, 6, index])
    f = sample_factors(rng, content)
    beauty = oracle_beauty(f, taste)
    if taste == DEFAULT_TASTE:
        caption = make_caption(rng, f, beauty, p_look=p_look)
    else:  # the caption from a copy of the stream; the pixels from where the default's end
        copy = np.random.Generator(type(rng.bit_generator)())
        copy.bit_generator.state = rng.bit_generator.state
        caption = make_caption(copy, f, beauty, p_look=p_look, taste=taste)
        make_caption(rng, f, oracle_beauty(f), p_look=p_look)
    png = encode_png(render(f, size, rng))
    return {"index": index, "factors": f, "beauty": beauty, "caption": caption, "png": png}


def _render_chunk(args: tuple[int, int, int, int, float, list[Content] | None, Taste]
                  ) -> list[dict]:
    seed, start, stop, size, p_look, contents, taste = args
    if contents is None:
        return [image_record(seed, i, size, p_look, taste=taste) for i in range(start, stop)]
    return [image_record(seed, i, size, p_look, c, taste)
            for i, c in zip(range(start, stop), contents, strict=True)]


def assign_splits(n: int, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """A seeded permutation cut into train / val / test; returns the split name per image."""
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    split = np.empty(n, dtype=object)
    split[order[:n_test]] = "test"
    split[order[n_test:n_test + n_val]] = "val"
    split[order[n_test + n_val:]] = "train"
    return split


def image_id(index: int) -> str:
    return f"img-{index:07d}"


def make_queries(spec: WorldSpec) -> tuple[pa.Table, pa.Table]:
    """Content queries (train/val/test, disjoint content keys) and held-out-word paraphrases.

    Returns:
        (queries, truth): ``queries`` has query_id, query, split, kind; ``truth`` has the
        content key each query asks for (``count`` 0 and ``background`` "" mean "any") and the
        look it asks for (``look``: "" or "good"/"bad:<factor>").
    """
    rng = np.random.default_rng([spec.seed, 3])
    keys = []
    for colour in COLOURS:
        for shape in SHAPES:
            keys.append((shape, colour, 0, ""))
            keys += [(shape, colour, c, "") for c in COUNTS]
            keys += [(shape, colour, 0, b) for b in BACKGROUNDS]
            keys += [(shape, colour, c, b) for c in COUNTS for b in BACKGROUNDS]
    keys = [keys[i] for i in rng.permutation(len(keys))[:min(spec.n_queries, len(keys))]]
    n = len(keys)
    n_test = int(round(n * 0.3))
    n_val = int(round(n * 0.1))
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    rows, truth = [], []
    for i, ((shape, colour, count, bg), split) in enumerate(zip(keys, splits, strict=True)):
        text = content_phrase(rng, shape, colour, count or None, bg or None)
        qid = f"q-{i:05d}"
        rows.append({"query_id": qid, "query": text, "split": split, "kind": "content"})
        truth.append({"query_id": qid, "shape": shape, "colour": colour, "count": count,
                      "background": bg, "look": ""})
    test_keys = [k for k, s in zip(keys, splits, strict=True) if s == "test"] or keys
    for j in range(spec.n_paraphrases):
        shape, colour, count, bg = test_keys[int(rng.integers(len(test_keys)))]
        content = content_phrase(rng, shape, colour, count or None, bg or None, heldout=True)
        look, looks = "", []
        if rng.random() < 0.5:  # ask for a look, in held-out words
            good = bool(rng.random() < 0.5)
            looks = heldout_look_phrases(rng, good, int(rng.integers(1, 3)))
            look = "good" if good else "bad"
        text = compose(rng, content, looks, heldout_nouns=True) if looks else content
        qid = f"p-{j:05d}"
        rows.append({"query_id": qid, "query": text, "split": "test", "kind": "paraphrase"})
        truth.append({"query_id": qid, "shape": shape, "colour": colour, "count": count,
                      "background": bg, "look": look})
    return pa.Table.from_pylist(rows), pa.Table.from_pylist(truth)


def content_matches(truth: Mapping[str, Any], labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[N]`` bool: the images that show the content a query asks for.

    Args:
        truth: a row of ``eval/query_truth.parquet``: shape and colour always, ``count`` and
            ``background`` where the query names them (0 and "" mean "any").
        labels: the oracle's content columns (shape, colour, count, background) as arrays.
    """
    ok = (np.asarray(labels["shape"]) == truth["shape"]) & \
        (np.asarray(labels["colour"]) == truth["colour"])
    if truth["count"]:
        ok &= np.asarray(labels["count"]) == truth["count"]
    if truth["background"]:
        ok &= np.asarray(labels["background"]) == truth["background"]
    return ok


def relevant_counts(truth_rows: Sequence[Mapping[str, Any]],
                    labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[Q]`` int: per query, how many images show the content it asks for.

    Args:
        truth_rows: rows of ``eval/query_truth.parquet`` (:func:`content_matches`).
        labels: the content columns of the images counted (one gallery / split).
    """
    return np.array([int(content_matches(t, labels).sum()) for t in truth_rows], np.int64)


def relevant_distribution(counts: np.ndarray, few: int = 10) -> dict[str, Any]:
    """Summary of relevant images per query: min, p10, median, mean, max, the number of
    queries and the number with fewer than ``few`` relevant images."""
    c = np.asarray(counts, np.float64)
    if not len(c):
        return {"queries": 0, f"under_{few}": 0}
    return {"min": int(c.min()), "p10": float(np.percentile(c, 10)),
            "median": float(np.median(c)), "mean": round(float(c.mean()), 2),
            "max": int(c.max()), "queries": int(len(c)), f"under_{few}": int((c < few).sum())}


@dataclass(frozen=True)
class GalleryImage:
    """One image to render for a gallery: the query it is for, its split and its content."""

    query_id: str
    split: str
    content: Content


def plan_galleries(queries: Sequence[Mapping[str, Any]], labels: Mapping[str, np.ndarray],
                   image_splits: np.ndarray, relevant: int, seed: int) -> list[GalleryImage]:
    """The gallery images to render, in plan order (val queries, then test, in query order).

    For each content query of a gallery split, the images of that split (natural and already
    planned) with its content are counted; while fewer than ``relevant``, one more image with
    that content is planned, the attributes the query leaves open drawn uniformly (count
    1..3, any background) from a generator seeded by ``seed``.

    Args:
        queries: content queries: ``query_id``, ``split`` and the truth columns (shape,
            colour, count, background).
        labels: the natural images' content columns.
        image_splits: ``[N]`` the natural images' splits.
        relevant: the target number of relevant images per query (0: plan nothing).
        seed: the world's seed.
    """
    rng = np.random.default_rng([seed, 4])
    have: Counter[tuple] = Counter(zip(np.asarray(image_splits).tolist(),
                                       *(np.asarray(labels[k]).tolist() for k in CONTENT_KEYS),
                                       strict=True))
    plan: list[GalleryImage] = []
    if relevant <= 0:
        return plan
    for split in GALLERY_SPLITS:
        for q in (q for q in queries if q["split"] == split):
            n = sum(v for (sp, sh, co, cn, bg), v in have.items()
                    if sp == split and sh == q["shape"] and co == q["colour"]
                    and (not q["count"] or cn == q["count"])
                    and (not q["background"] or bg == q["background"]))
            for _ in range(relevant - n):
                count = int(q["count"]) or int(rng.integers(1, 4))
                bg = q["background"] or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
                c = Content(q["shape"], q["colour"], count, bg)
                plan.append(GalleryImage(q["query_id"], split, c))
                have[(split, *c)] += 1
    return plan


def gallery_order(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``n`` planned gallery images: the image with index
    ``n_images + k`` is the plan's ``order[k]``-th (consecutive ids reveal no query group)."""
    return np.random.default_rng([seed, 5]).permutation(n)


def _content_queries(queries: pa.Table, truth: pa.Table) -> list[dict[str, Any]]:
    """The content queries as rows: query_id, split and the content asked for."""
    t = {r["query_id"]: r for r in truth.to_pylist()}
    return [{**t[q["query_id"]], "split": q["split"]} for q in queries.to_pylist()
            if q["kind"] == "content"]


def _labels(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.asarray([r[k] for r in rows]) for k in CONTENT_KEYS}


def gallery_summary(content_queries: Sequence[Mapping[str, Any]],
                    oracle_rows: Sequence[Mapping[str, Any]], n_natural: int,
                    relevant: int) -> dict[str, Any]:
    """Per gallery split: images added and relevant-per-query before (natural images only)
    and after (:func:`relevant_distribution`)."""
    out: dict[str, Any] = {"relevant": relevant}
    for split in GALLERY_SPLITS:
        qs = [q for q in content_queries if q["split"] == split]
        natural = [r for r in oracle_rows[:n_natural] if r["split"] == split]
        every = [r for r in oracle_rows if r["split"] == split]
        out[split] = {"added": len(every) - len(natural),
                      "before": relevant_distribution(relevant_counts(qs, _labels(natural))),
                      "after": relevant_distribution(relevant_counts(qs, _labels(every)))}
    return out


def generate_world(spec: WorldSpec, out_dir: str | Path, workers: int | None = None,
                   progress: bool = True) -> dict:
    """Write a world directory (see module docstring); returns summary counts.

    The natural images are rendered first, then the galleries' images
    (:func:`plan_galleries`), in the same process pool.

    Args:
        spec: size, seed and fractions.
        out_dir: target directory (created; existing world files are replaced).
        workers: render processes (default: CPU count, at most 8). The output does not depend
            on it.
        progress: show a progress bar.
    """
    from tqdm import tqdm

    t0 = time.time()
    out = Path(out_dir)
    for sub in ("corpus", "queries", "eval"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("*.parquet"):
            old.unlink()
    splits = assign_splits(spec.n_images, spec.seed, spec.val_fraction, spec.test_fraction)
    workers = workers or min(8, os.cpu_count() or 1)
    chunk = 250
    taste = resolve_taste(spec.taste)
    tasks = [(spec.seed, s, min(s + chunk, spec.n_images), spec.image_size, spec.p_look, None,
              taste) for s in range(0, spec.n_images, chunk)]
    corpus_rows: list[dict] = []
    oracle_rows: list[dict] = []
    file_idx = 0

    def flush(final: bool = False) -> None:
        nonlocal corpus_rows, file_idx
        while len(corpus_rows) >= spec.rows_per_file or (final and corpus_rows):
            part, corpus_rows = corpus_rows[:spec.rows_per_file], corpus_rows[spec.rows_per_file:]
            write_corpus(pa.Table.from_pylist(part, schema=CORPUS_SCHEMA),
                         out / "corpus" / f"part-{file_idx:05d}.parquet", row_group_size=500)
            file_idx += 1

    def collect(results: Iterable[list[dict]], split_of: Sequence[str],
                rendered_for: Sequence[str]) -> None:
        for recs in results:
            for r in recs:
                i = r["index"]
                f: Factors = r["factors"]
                sp, why = split_of[i], rendered_for[i]
                corpus_rows.append({"id": image_id(i), "image": r["png"], "caption": r["caption"],
                                    "split": sp})
                oracle_rows.append({"id": image_id(i), "split": sp, "beauty": r["beauty"],
                                    **f.as_dict(), "rendered_for": why})
            bar.update(len(recs))
            flush()

    queries, truth = make_queries(spec)
    content_queries = _content_queries(queries, truth)
    bar = tqdm(total=spec.n_images, desc="render world", unit="img", disable=not progress)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    run = pool.map if pool else map
    try:
        split_of: list[str] = splits.tolist()
        rendered_for = [""] * spec.n_images
        collect(run(_render_chunk, tasks), split_of, rendered_for)
        flush(final=True)  # the natural images' files are those of a world without galleries
        plan = plan_galleries(content_queries, _labels(oracle_rows), splits,
                              spec.gallery_relevant, spec.seed)
        gallery = [plan[j] for j in gallery_order(len(plan), spec.seed)]
        split_of += [g.split for g in gallery]
        rendered_for += [g.query_id for g in gallery]
        bar.total = spec.n_images + len(gallery)
        bar.refresh()
        n = spec.n_images
        tasks = [(spec.seed, n + s, n + min(s + chunk, len(gallery)), spec.image_size,
                  spec.p_look, [g.content for g in gallery[s:s + chunk]], taste)
                 for s in range(0, len(gallery), chunk)]
        collect(run(_render_chunk, tasks), split_of, rendered_for)
    finally:
        if pool:
            pool.shutdown()
        bar.close()
    flush(final=True)
    oracle = pa.Table.from_pylist(oracle_rows)
    oracle = oracle.set_column(oracle.schema.get_field_index("beauty"), "beauty",
                               oracle["beauty"].cast(pa.float32()))
    pq.write_table(oracle, out / "eval" / "oracle.parquet")
    pq.write_table(pa.Table.from_pylist(
        [{"id": image_id(spec.n_images + k), "split": g.split} for k, g in enumerate(gallery)],
        schema=GALLERIES_SCHEMA), out / GALLERIES_FILE)
    write_queries(queries, out / "queries" / QUERIES_FILE)
    pq.write_table(truth, out / "eval" / "query_truth.parquet")
    write_taste(out / "eval", taste)
    all_splits = np.asarray(split_of, dtype=object)
    counts = {s: int((all_splits == s).sum()) for s in SPLITS}
    qcounts = {f"{k}/{s}": n for (k, s), n in _count(queries).items()}
    beauty = np.array([r["beauty"] for r in oracle_rows[:spec.n_images]])
    galleries = gallery_summary(content_queries, oracle_rows, spec.n_images,
                                spec.gallery_relevant)
    summary = {"images": len(oracle_rows), "natural_images": spec.n_images,
               "gallery_images": len(gallery), "splits": counts, "queries": qcounts,
               "galleries": galleries, "corpus_files": file_idx,
               "beauty_mean": float(beauty.mean()), "beauty_std": float(beauty.std()),
               "factors": list(FACTORS), "seconds": round(time.time() - t0, 2)}
    for split in GALLERY_SPLITS:
        g = galleries[split]
        log.info("%s gallery: +%d images for %d content queries; relevant per query before "
                 "%s, after %s", split, g["added"], g["after"]["queries"],
                 _fmt_dist(g["before"]), _fmt_dist(g["after"]))
    log.info("world taste (hidden, eval/taste.json): %s", taste.name)
    log.info("world: %d images (%d natural + %d gallery; %s) in %.1f s -> %s", len(oracle_rows),
             spec.n_images, len(gallery), counts, summary["seconds"], out)
    return summary


def _fmt_dist(d: Mapping[str, Any]) -> str:
    if not d.get("queries"):
        return "(no queries)"
    return (f"min {d['min']} p10 {d['p10']:g} median {d['median']:g} mean {d['mean']:g} "
            f"max {d['max']} ({d['under_10']} of {d['queries']} under 10)")


def world_fingerprint(spec: WorldSpec, n_probe: int = 64) -> dict:
    """What identifies a world without rendering all of it: its spec (seed, size, split
    fractions ...) and a hash of the first ``n_probe`` images' captions (pure in
    ``(seed, index)``; they encode each image's sampled factors).

    A model trained on one world must only be evaluated on the same world (else its training
    images can sit in the other world's test split); the quickstart compares fingerprints
    before it reuses the shipped base model. Pixels are left out on purpose: an image
    library's rounding change alters no split and no factor. The taste is hidden and left out
    of the described spec; it changes the captions (which true things are said), so it changes
    the hash.

    It describes the **natural images only**: ``gallery_relevant`` (and ``rows_per_file``)
    are left out. Gallery images are rendered after the natural ones, change none of them and
    are never trained on, so a model trained on a world's train split fits that world with
    any galleries (the shipped base, trained before galleries existed, fits the default world
    with ``gallery_relevant=20``).
    """
    import hashlib
    from dataclasses import asdict

    h = hashlib.sha256()
    for i in range(min(n_probe, spec.n_images)):
        r = image_record(spec.seed, i, spec.image_size, spec.p_look,
                         taste=resolve_taste(spec.taste))
        h.update(r["caption"].encode() + b"\n")
    described = {k: v for k, v in asdict(spec.spec()).items()
                 if k not in ("rows_per_file", "gallery_relevant", "taste")}
    return {"spec": described, "probe": n_probe, "sha256": h.hexdigest()}


def _count(queries: pa.Table) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for k, s in zip(queries["kind"].to_pylist(), queries["split"].to_pylist(), strict=True):
        out[(k, s)] = out.get((k, s), 0) + 1
    return out


class World:
    """Read access to a generated world (corpus for everyone; ``eval/`` for evaluation only)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / "corpus").is_dir():
            raise FileNotFoundError(f"{self.root} is not a world directory (no corpus/)")

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    def corpus(self, columns: list[str] | None = None, split: str | None = None,
               galleries: bool = True) -> pa.Table:
        """The corpus table.

        Args:
            columns: the columns to read (default all).
            split: only rows of this split.
            galleries: keep the gallery images (:meth:`gallery_ids`); False: natural images
                only (what training and votes read).
        """
        drop = set() if galleries else self.gallery_ids(split)
        if not drop:
            return read_corpus(self.corpus_dir, columns, split)
        want = list(columns) if columns else None
        cols = None if want is None else list(dict.fromkeys([*want, "id"]))
        t = read_corpus(self.corpus_dir, cols, split)
        keep = pc.invert(pc.is_in(t["id"], value_set=pa.array(sorted(drop), pa.string())))
        t = t.filter(keep)
        return t if want is None else t.select(want)

    def gallery_ids(self, split: str | None = None) -> set[str]:
        """The ids of the images rendered for the dense galleries (optionally one split's);
        empty for a world made before galleries (no ``galleries.parquet``)."""
        path = self.root / GALLERIES_FILE
        if not path.is_file():
            return set()
        t = pq.read_table(path, columns=["id", "split"])
        return {i for i, s in zip(t["id"].to_pylist(), t["split"].to_pylist(), strict=True)
                if split is None or s == split}

    def queries(self, split: str | None = None, kind: str | None = None) -> pa.Table:
        """The queries table (optionally one split and / or kind only)."""
        return read_queries(self.root / "queries" / QUERIES_FILE, [split] if split else [],
                            [kind] if kind else [])

    def oracle(self) -> pa.Table:
        """The hidden oracle (evaluation only)."""
        return pq.read_table(self.root / "eval" / "oracle.parquet")

    def query_truth(self) -> pa.Table:
        """What each query asks for (evaluation only)."""
        return pq.read_table(self.root / "eval" / "query_truth.parquet")

    def taste(self) -> Taste:
        """The hidden human's taste (evaluation and the simulated raters only; the default
        taste for a world made before tastes were a setting)."""
        return read_taste(self.root / "eval")
