"""Index directories in object storage: published from a local build, loaded from a local cache.

faiss reads and memory-maps local files only, so an index at an ``s3://`` / ``gs://`` prefix
is built into a local directory and uploaded (:func:`publish_index`), and loaded from a local
copy (:func:`local_index_dir`). A local path (or ``file://``) is used where it is; nothing
here copies it.

Publishing: the old ``manifest.json`` is deleted first, then every other file is uploaded
all-or-nothing (:meth:`aligner.data.io.Store.upload`), the manifest last, so a reader that
finds a manifest finds the files it names, and one that looks mid-build finds no manifest
(not a finished index) rather than half of one.

The cache: ``$ALIGNER_CACHE/index/<key>/`` (default ``~/.cache/aligner/index/<key>/``), where
the key hashes the URI and the bytes of its manifest, so a rebuilt index (a new manifest: its
time, timings and counts) lands in a new directory and a reload of an unchanged one downloads
nothing. Only what loading needs is fetched: the manifest, ``ids.parquet`` and the shard files
asked for (a serving replica that holds some shards downloads only those). Every file is
downloaded into a temp name and renamed, under a lock file, so two replicas on one node
neither corrupt nor duplicate a download; once the files are in, the remote manifest is read
again and the copy is refused (its new files removed) if it changed meanwhile, so files of two
builds never mix under one key. Older versions stay on disk until deleted (any that no running
process uses can go).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from aligner.data.io import Store, atomic_write, is_uri

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
IDS_FILE = "ids.parquet"  # aligner.retrieval.index.IDS_FILE (this module is imported by it)
SOURCE_FILE = "source.txt"
LOCK_FILE = ".lock"
#: downloads of one load that found the remote manifest changed before giving up
ATTEMPTS = 3


def remote_store(path: str | Path) -> Store | None:
    """The object store an index path names, or None for a local path or ``file://``."""
    if not is_uri(path):
        return None
    store = Store(path)
    return None if store.is_local else store


def local_index_dir(path: str | Path, shards: Sequence[int] | None = None) -> Path:
    """A local directory holding the index at ``path`` (or the part of it that loading
    ``shards`` needs: ``None`` all of them).

    A local path is returned as given (``Path(path)``; loading checks it); ``file://`` as its
    local path; an object-store URI as its cached copy (:func:`fetch_index`).

    Raises:
        FileNotFoundError: (object stores) no bucket, nothing at the prefix, no manifest, or a
            shard file the manifest names is missing.
    """
    store = remote_store(path)
    return fetch_index(store, shards) if store is not None else as_local(path)


def as_local(path: str | Path) -> Path:
    """A local path (as given) or a ``file://`` URI (its path) as a ``Path``."""
    return Path(Store(path).root) if is_uri(path) else Path(path)


def cache_root() -> Path:
    """Where index copies go: ``$ALIGNER_CACHE/index`` (default ``~/.cache/aligner/index``)."""
    from aligner.retrieval.textcache import cache_dir

    return cache_dir() / "index"


def cache_key(uri: str, manifest: bytes) -> str:
    """The cache directory name of an index: a hash of its URI and its manifest's bytes."""
    h = hashlib.sha256(uri.rstrip("/").encode("utf-8"))
    h.update(b"\0")
    h.update(manifest)
    return h.hexdigest()[:32]


def needed_files(manifest: dict, shards: Sequence[int] | None) -> list[str]:
    """The files loading ``shards`` (None: all) needs besides the manifest: ``ids.parquet``
    and those shards' files (numbers the manifest does not have are left to the loader to
    refuse)."""
    entries = manifest.get("shards") or []
    numbers = range(len(entries)) if shards is None else shards
    return [IDS_FILE] + [entries[s]["file"] for s in numbers if 0 <= s < len(entries)]


def _remote_manifest(store: Store) -> bytes:
    """The manifest's bytes.

    Raises:
        FileNotFoundError: no bucket, nothing at the prefix, or no manifest (as
            :func:`aligner.runtime.manifest.read_manifest` says it for a local directory).
    """
    store.check("index")
    if not store.is_file(MANIFEST_FILE):
        if not store.exists(""):
            raise FileNotFoundError(f"index directory {store.uri} does not exist")
        raise FileNotFoundError(f"no manifest.json in {store.uri}: is this a finished job "
                                "output?")
    return store.read_bytes(MANIFEST_FILE)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory/.lock`` (processes on one node wait for each other)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(store: Store, files: Sequence[str], into: Path) -> tuple[list[str], int]:
    """Download the files not yet in ``into``; returns (the ones downloaded, their bytes).

    Raises:
        FileNotFoundError: a file is not in the store.
    """
    got, size = [], 0
    for rel in files:
        if (into / rel).is_file():
            continue
        if not store.is_file(rel):
            raise FileNotFoundError(f"index file {store.uri_of(rel)} is missing")
        size += store.download(rel, into / rel)
        got.append(rel)
    return got, size


def _changed(store: Store, manifest: bytes) -> bool:
    """Whether the remote manifest is no longer ``manifest`` (replaced, or deleted by a build
    that is writing the index)."""
    try:
        return store.read_bytes(MANIFEST_FILE) != manifest
    except FileNotFoundError:
        return True


def _try_fetch(store: Store, shards: Sequence[int] | None) -> Path | None:
    """One attempt of :func:`fetch_index`; None when the manifest changed meanwhile."""
    import json

    t0 = time.time()
    manifest = _remote_manifest(store)
    files = needed_files(json.loads(manifest), shards)
    into = cache_root() / cache_key(store.uri, manifest)
    with _locked(into):
        got, size = _download(store, files, into)
        if got and _changed(store, manifest):
            for rel in got:
                (into / rel).unlink(missing_ok=True)
            log.warning("index %s changed while it was downloaded; trying again", store.uri)
            return None
        if not (into / MANIFEST_FILE).is_file():
            with atomic_write(into / MANIFEST_FILE) as tmp:
                tmp.write_bytes(manifest)
            (into / SOURCE_FILE).write_text(store.uri + "\n", encoding="utf-8")
    if got:
        log.info("index %s: downloaded %d file(s), %.1f MB, to %s in %.1f s", store.uri,
                 len(got), size / 1e6, into, time.time() - t0)
    else:
        log.info("index %s: using the cached copy in %s", store.uri, into)
    return into


def fetch_index(store: Store, shards: Sequence[int] | None = None) -> Path:
    """The local cached copy of the index in ``store`` (see the module docstring), holding
    the manifest, ``ids.parquet`` and the files of ``shards`` (None: every shard).

    Raises:
        FileNotFoundError: no bucket, nothing at the prefix, no manifest, or a missing file.
        RuntimeError: the index kept changing while it was downloaded (a build writing it).
    """
    for _ in range(ATTEMPTS):
        into = _try_fetch(store, shards)
        if into is not None:
            return into
    raise RuntimeError(f"index {store.uri} changed during each of {ATTEMPTS} downloads: is a "
                       "build writing it? Load it once the build has finished")


def publish_index(local: Path, store: Store) -> int:
    """Upload a finished local index directory to ``store``: the old manifest deleted first,
    every other file all-or-nothing, the manifest last (see the module docstring). Returns
    the files uploaded.

    Raises:
        FileNotFoundError: ``local`` has no manifest (not a finished build).
    """
    if not (local / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{local} has no {MANIFEST_FILE}: not a finished index")
    t0 = time.time()
    store.delete(MANIFEST_FILE)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith("."))
    size = sum(store.upload(local / rel, rel) for rel in files)
    size += store.upload(local / MANIFEST_FILE, MANIFEST_FILE)
    log.info("index uploaded to %s: %d file(s), %.1f MB in %.1f s", store.uri, len(files) + 1,
             size / 1e6, time.time() - t0)
    return len(files) + 1
