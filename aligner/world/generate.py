"""Generate the built-in aesthetic world: corpus, held-out queries and the hidden oracle.

Layout of a world directory::

    corpus/part-00000.parquet ...   id, image (PNG bytes), caption, split    <- what systems see
    queries/queries.parquet         query_id, query, split, kind            <- what systems see
    eval/oracle.parquet             id, beauty, content labels, look factors  <- evaluation only
    eval/query_truth.parquet        query_id, shape, colour, count, background, look
    manifest.json

The oracle lives apart from the corpus: only evaluation may read ``eval/``. Same seed and
size, same world (byte for byte), whatever the number of worker processes.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aligner.data.corpus import CORPUS_SCHEMA, read_corpus, write_corpus
from aligner.data.queries import QUERIES_FILE, read_queries, write_queries
from aligner.world.captions import compose, content_phrase, heldout_look_phrases
from aligner.world.render import Factors, encode_png, oracle_beauty, render, sample_factors
from aligner.world.vocab import BACKGROUNDS, COLOURS, COUNTS, FACTORS, SHAPES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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

    def spec(self) -> WorldSpec:
        """This spec alone (a subclass's extra fields, such as a job's output, dropped)."""
        return WorldSpec(**{f.name: getattr(self, f.name) for f in fields(WorldSpec)})


def image_record(seed: int, index: int, size: int, p_look: float) -> dict:
    """Everything about image ``index``: factors, beauty, caption, PNG. Pure in (seed, index)."""
    from aligner.world.captions import make_caption

    rng = np.random.default_rng([seed, 1, index])
    f = sample_factors(rng)
    beauty = oracle_beauty(f)
    caption = make_caption(rng, f, beauty, p_look=p_look)
    png = encode_png(render(f, size, rng))
    return {"index": index, "factors": f, "beauty": beauty, "caption": caption, "png": png}


def _render_chunk(args: tuple[int, int, int, int, float]) -> list[dict]:
    seed, start, stop, size, p_look = args
    return [image_record(seed, i, size, p_look) for i in range(start, stop)]


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


def generate_world(spec: WorldSpec, out_dir: str | Path, workers: int | None = None,
                   progress: bool = True) -> dict:
    """Write a world directory (see module docstring); returns summary counts.

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
    tasks = [(spec.seed, s, min(s + chunk, spec.n_images), spec.image_size, spec.p_look)
             for s in range(0, spec.n_images, chunk)]
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

    bar = tqdm(total=spec.n_images, desc="render world", unit="img", disable=not progress)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(_render_chunk, tasks) if pool else map(_render_chunk, tasks)
        for recs in results:
            for r in recs:
                i = r["index"]
                f: Factors = r["factors"]
                corpus_rows.append({"id": image_id(i), "image": r["png"], "caption": r["caption"],
                                    "split": splits[i]})
                oracle_rows.append({"id": image_id(i), "split": splits[i], "beauty": r["beauty"],
                                    **f.as_dict()})
            bar.update(len(recs))
            flush()
    finally:
        if pool:
            pool.shutdown()
        bar.close()
    flush(final=True)
    oracle = pa.Table.from_pylist(oracle_rows)
    oracle = oracle.set_column(oracle.schema.get_field_index("beauty"), "beauty",
                               oracle["beauty"].cast(pa.float32()))
    pq.write_table(oracle, out / "eval" / "oracle.parquet")
    queries, truth = make_queries(spec)
    write_queries(queries, out / "queries" / QUERIES_FILE)
    pq.write_table(truth, out / "eval" / "query_truth.parquet")
    counts = {s: int((splits == s).sum()) for s in SPLITS}
    qcounts = {f"{k}/{s}": n for (k, s), n in _count(queries).items()}
    beauty = np.array([r["beauty"] for r in oracle_rows])
    summary = {"images": spec.n_images, "splits": counts, "queries": qcounts,
               "corpus_files": file_idx, "beauty_mean": float(beauty.mean()),
               "beauty_std": float(beauty.std()), "factors": list(FACTORS),
               "seconds": round(time.time() - t0, 2)}
    log.info("world: %d images (%s) in %.1f s -> %s", spec.n_images, counts, summary["seconds"], out)
    return summary


def world_fingerprint(spec: WorldSpec, n_probe: int = 64) -> dict:
    """What identifies a world without rendering all of it: its spec (seed, size, split
    fractions ...) and a hash of the first ``n_probe`` images' captions (pure in
    ``(seed, index)``; they encode each image's sampled factors).

    A model trained on one world must only be evaluated on the same world (else its training
    images can sit in the other world's test split); the quickstart compares fingerprints
    before it reuses the shipped base model. Pixels are left out on purpose: an image
    library's rounding change alters no split and no factor.
    """
    import hashlib
    from dataclasses import asdict

    h = hashlib.sha256()
    for i in range(min(n_probe, spec.n_images)):
        r = image_record(spec.seed, i, spec.image_size, spec.p_look)
        h.update(r["caption"].encode() + b"\n")
    described = {k: v for k, v in asdict(spec.spec()).items() if k != "rows_per_file"}
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

    def corpus(self, columns: list[str] | None = None, split: str | None = None) -> pa.Table:
        """The corpus table (optionally one split only)."""
        return read_corpus(self.corpus_dir, columns, split)

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
