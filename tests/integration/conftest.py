"""What the integration tests stand on.

Object storage: ``s3`` (module) runs a real S3-compatible server (LocalBucket,
``tests/helpers/s3.py``) with buckets ``corpus``, ``out``, ``emb`` and ``index``; ``s3_env``
points pyarrow at it through the environment (``AWS_ENDPOINT_URL`` ...) and returns a
filesystem for checks; ``s3_corpus`` writes a small image corpus to ``s3://corpus/world``.

Serving: a small world with a base and a really aligned model and
their indexes, Serve's HTTP proxy on 127.0.0.1, and the application deployed on it.

``serving_world`` (session): a 300-image world; the built-in model at its seeded initial
weights as the base; embeddings and a Flat index through the real jobs; a 6-step ranked-DPO
fine-tune on Ray Train as the aligned model, re-embedded and indexed. ``served`` (module): the
application from ``serving.app.build_app`` on Serve's proxy, with an API key, small limits the
bad-input tests can reach, and an OpenAI-compatible rephraser on a local fake LLM server that
answers at once, except for queries containing "slowly" (it then waits past the timeout).
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from tests.helpers.net import free_port
from tests.helpers.s3 import ENV, local_bucket, write_corpus
from tests.helpers.serving import API_KEY, FakeLLM, app_args, deploy

S3_BUCKETS = ("corpus", "out", "emb", "index")


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> str:
    """A LocalBucket server with :data:`S3_BUCKETS` for one test module; its endpoint URL."""
    with local_bucket(tmp_path_factory.mktemp("s3data"), S3_BUCKETS) as url:
        yield url


@pytest.fixture()
def s3_env(s3, monkeypatch) -> pafs.S3FileSystem:
    """The server in this process's environment (as a deployment would set it); returns a
    filesystem on it for the test's own checks."""
    for k, v in {"AWS_ENDPOINT_URL": s3, **ENV}.items():
        monkeypatch.setenv(k, v)
    return pafs.S3FileSystem(endpoint_override=s3, access_key=ENV["AWS_ACCESS_KEY_ID"],
                             secret_key=ENV["AWS_SECRET_ACCESS_KEY"], region=ENV["AWS_REGION"])


@pytest.fixture()
def s3_corpus(s3_env) -> list[str]:
    """Two Parquet files under s3://corpus/world/ (one image cut short); the ids."""
    return write_corpus(s3_env)


@pytest.fixture(scope="session")
def serving_world(ray_session, tmp_path_factory) -> SimpleNamespace:
    from aligner.preferences.build import BuildPreferencesConfig, build_preferences
    from aligner.rephrase.run import RephraseConfig, run_rephrase
    from aligner.retrieval.embed import EmbedConfig, run_embed
    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint
    from aligner.training.config import AlignConfig
    from aligner.training.runs import run_align
    from jobs import build_index, make_world

    root = tmp_path_factory.mktemp("serving")
    make_world.run(replace(make_world.MakeWorldConfig(), output=str(root / "world"),
                           n_images=300, n_queries=60, n_paraphrases=12, progress=False,
                           gallery_relevant=0))  # serving needs no dense galleries
    base = save_checkpoint(load_retriever(ModelSpec(), device="cpu"), root / "base")
    ec = EmbedConfig(input=str(root / "world" / "corpus"), output=str(root / "emb_base"),
                     model=ModelSpec(checkpoint=str(base)), progress=False, batch_size=64)
    run_embed(ec)
    ic = replace(build_index.IndexConfig(), embeddings=ec.output, output=str(root / "index_base"),
                 factory="Flat", progress=False)
    build_index.run(ic)
    run_rephrase(RephraseConfig(input=str(root / "world" / "queries" / "queries.parquet"),
                                output=str(root / "rephrased"), kinds=["content"],
                                progress=False))
    build_preferences(BuildPreferencesConfig(embeddings=ec.output, queries=str(root / "rephrased"),
                                             output=str(root / "prefs"),
                                             splits=["train", "val"], examples=0))
    ac = AlignConfig(world=str(root / "world"), preferences=str(root / "prefs"),
                     output=str(root / "aligned"), model=ModelSpec(checkpoint=str(base)),
                     num_workers=1)
    ac = replace(ac, train=replace(ac.train, steps=6, lr=1e-3, pairs_per_step=16,
                                   captions_per_step=32, eval_every=3, checkpoint_every=6,
                                   selection="last"))
    run_align(ac)
    aligned = root / "aligned" / "checkpoint"
    ea = replace(ec, output=str(root / "emb_aligned"), model=ModelSpec(checkpoint=str(aligned)))
    run_embed(ea)
    build_index.run(replace(ic, embeddings=ea.output, output=str(root / "index_aligned")))
    return SimpleNamespace(root=root, corpus=root / "world" / "corpus", base=Path(base),
                           aligned=aligned, index_base=root / "index_base",
                           index_aligned=root / "index_aligned")


@pytest.fixture(scope="session")
def fake_llm() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="session")
def serve_http(ray_session) -> str:
    """Serve's HTTP proxy on 127.0.0.1 (started once; its options cannot change later)."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port),
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(serve_http, serving_world, fake_llm, tmp_path_factory) -> SimpleNamespace:
    """The application, deployed for one test module (deleted afterwards)."""
    from ray import serve

    data_dir = tmp_path_factory.mktemp("serve-data")
    os.environ.pop("ALIGNER_API_KEY", None)
    args = app_args(serving_world, data_dir, fake_llm)
    deploy(args)
    yield SimpleNamespace(url=serve_http, api_key=API_KEY, args=args, world=serving_world,
                          data_dir=data_dir, llm=fake_llm)
    serve.delete("aligner")
