"""A real S3-compatible HTTP server for the object-storage tests (no mocks).

The server is LocalBucket (PyPI ``localbucket``, a single stdlib-only module), started on
127.0.0.1 on a free port with its own data directory; the code under test reaches it only
through pyarrow's S3 filesystem and ``AWS_ENDPOINT_URL``, as it would reach AWS, GCS's S3 API
or MinIO. (moto's server mode needs botocore, which requires python-dateutil<3; the lock pins
4.0.0.) Bucket names follow S3's rules (3-63 characters): a shorter one is refused as missing.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.helpers.net import free_port

#: the variables that point pyarrow (and every Ray worker it pickles a filesystem for) at it
ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def local_bucket(data: Path, buckets: Sequence[str], timeout_s: float = 30.0) -> Iterator[str]:
    """Run a LocalBucket server over ``data`` with ``buckets``; yields its endpoint URL.

    Raises:
        RuntimeError: the server did not answer within ``timeout_s``.
    """
    for bucket in buckets:
        (data / bucket).mkdir(parents=True, exist_ok=True)  # a bucket is a folder
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "localbucket", str(data), "--host",
                             "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the S3 server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def upload_dir(local: Path, uri: str) -> None:
    """Every file under ``local`` to ``uri`` (as a dataset copied into a bucket)."""
    from aligner.data.io import Store

    store = Store(uri)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            store.upload(p, p.relative_to(local).as_posix())


#: the corpus :func:`write_corpus` writes: images, and the one cut short
N_IMAGES = 30
CORRUPT = 3


def write_corpus(fs, prefix: str = "corpus/world", seed: int = 11) -> list[str]:
    """Two Parquet files of PNGs (``id``, ``image``, ``split``) under ``prefix`` in ``fs``,
    image :data:`CORRUPT` cut short; returns the ids."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers.embed_faults import png

    rng = np.random.default_rng(seed)
    ids = [f"s3img{i:03d}" for i in range(N_IMAGES)]
    images = [png(rng) for _ in ids]
    images[CORRUPT] = images[CORRUPT][:30]
    for part, (lo, hi) in enumerate([(0, 18), (18, N_IMAGES)]):
        pq.write_table(pa.table({"id": ids[lo:hi], "image": images[lo:hi],
                                 "split": ["train"] * (hi - lo)}),
                       f"{prefix}/part-{part}.parquet", filesystem=fs)
    return ids
