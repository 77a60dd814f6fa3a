"""The benchmark suite (bench/run_all.py): a tiny real run writes a well-formed results.json,
RESULTS.md and PNG plots; growth exponents are fitted right; the GPU figures run on CUDA.

The tiny scale runs the embedding series with the plain loop (no Ray), the index benchmark
on a few thousand 64-dim vectors and the GPU step (skipped without CUDA): under a minute on
an idle 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
PNG = b"\x89PNG\r\n\x1a\n"


def _bench_import(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_loglog_slope_recovers_the_exponent():
    """y = 3 n^1 has slope 1, y = 5 n^0 slope 0, y = n^2 / 7 slope 2 (exact on log-log)."""
    figures = _bench_import("figures")
    n = [1_000, 10_000, 100_000]
    assert figures.loglog_slope(n, [3 * v for v in n]) == pytest.approx(1.0)
    assert figures.loglog_slope(n, [5.0] * 3) == pytest.approx(0.0, abs=1e-12)
    assert figures.loglog_slope(n, [v * v / 7 for v in n]) == pytest.approx(2.0)
    assert figures.loglog_slope([1_000], [1.0]) is None  # one point: no slope
    assert figures.family("IVF1024,PQ64,RFlat") == "IVF{L},PQ64,RFlat"


@pytest.mark.timeout(600)
def test_tiny_suite_writes_results_markdown_and_plots(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "bench", "--scale", "tiny", "--out", str(out),
                           "--workdir", str(work)], cwd=REPO, capture_output=True, text=True,
                          timeout=590, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res = json.loads((out / "results.json").read_text())
    m = res["machine"]
    assert m["cpu_count"] >= 1 and m["ram_gb"] > 0 and m["versions"]["torch"]
    assert m["versions"]["ray"] and m["date"] and "commit" in m["git"]
    steps = res["steps"]
    assert set(steps) == {"embed", "index", "align", "serve", "reward", "judge", "gpu"}
    assert steps["embed"]["status"] == "ok" and steps["index"]["status"] == "ok"
    assert steps["align"]["status"] == "skipped" and steps["align"]["reason"]
    assert steps["gpu"]["status"] in ("ok", "skipped")

    emb = res["figures"]["embed"]
    assert [p["n"] for p in emb["series"]] == [64, 128]
    assert all(p["seconds"] > 0 and p["peak_pss_mb"] > 0 and p["rows_failed"] == 0
               for p in emb["series"])
    assert emb["slopes"]["seconds"] is not None and emb["slopes"]["peak_pss_mb"] is not None
    assert emb["throughput"][0]["vs_plain"] == 1.0
    idx = res["figures"]["index"]
    assert {r["n"] for r in idx["rows"]} == {2000, 5000}
    flat = [r for r in idx["rows"] if r["index"] == "Flat"]
    assert all(r["recall_at_10"] == 1.0 and r["qps_1_vs_flat"] == 1.0 for r in flat)
    ivf = [r for r in idx["rows"] if r["family"] == "IVF{L},Flat"]
    assert ivf and all(0 < r["recall_at_10"] <= 1 and r["qps_1"] > 0 for r in ivf)
    assert idx["build_time_slopes"]["IVF{L},Flat"] is not None

    md = (out / "RESULTS.md").read_text()
    for heading in ("# Benchmark results", "### Embedding", "### Index", "### GPU"):
        assert heading in md
    assert "| N | index | params |" in md and "skipped: not run at scale tiny" in md
    for name in ("embed_scaling.png", "index_scaling.png"):
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000
        assert f"(plots/{name})" in md
    assert not (out / "plots" / "serve_latency.png").exists()

    # the report re-renders from the saved results alone
    again = tmp_path / "again"
    report = _bench_import("report")
    assert report.main([str(out / "results.json"), "--out", str(again)]) == 0
    assert (again / "RESULTS.md").read_text() == md


def test_bad_step_name_is_an_error(capsys):
    run_all = _bench_import("run_all")
    with pytest.raises(SystemExit) as e:
        run_all.parse(["--only", "embed,nonsense"])
    assert e.value.code == 2 and "nonsense" in capsys.readouterr().err


def test_index_benchmark_refuses_what_does_not_fit(tmp_path):
    """10M x 512 float32 needs ~38 GiB of RAM: the benchmark stops before writing data,
    naming the numbers and the way out (--index-dim)."""
    bench_index = _bench_import("bench_index")
    need = bench_index.needs(10_000_000, 512)
    assert need["ram"] == 2 * 10_000_000 * 512 * 4
    import psutil

    if psutil.virtual_memory().available > need["ram"]:
        pytest.skip("this machine has the memory for 10M x 512")
    with pytest.raises(SystemExit, match="index-dim"):
        bench_index.check_resources(10_000_000, 512, tmp_path)
    assert not any(tmp_path.iterdir())


def test_streamed_sizes_find_the_same_neighbours_as_a_held_flat(tmp_path):
    """Above --stream-above no Flat index is held: the exact scan of the files must give the
    same ground truth (so the same recall for every index) as the Flat index does, and the
    Flat row's QPS comes from a block of the vectors scaled to N."""
    bench_index = _bench_import("bench_index")
    common = ["--n", "6000", "--dim", "32", "--queries", "100", "--nprobe", "4",
              "--k-factor", "1,8", "--factories", "IVF{L}_PQ8x4fsr_Refine(SQfp16),IVF{L}_Flat"]
    held, streamed = tmp_path / "held.json", tmp_path / "streamed.json"
    assert bench_index.main(common + ["--json", str(held)]) == 0
    assert bench_index.main(common + ["--json", str(streamed), "--stream-above", "5000",
                                      "--flat-block", "2000"]) == 0
    a, b = json.loads(held.read_text()), json.loads(streamed.read_text())
    assert [(r["index"], r["params"]) for r in a[1:]] == [(r["index"], r["params"]) for r in b[1:]]
    assert [r["recall"] for r in a] == [r["recall"] for r in b]
    flat = b[0]
    assert flat["params"] == "exact scan" and flat["streamed"]["block"] == 2000
    assert all(r["flat_qps_1"] == flat["qps_1"] for r in b)  # every ratio against that row
    assert 0.2 < a[0]["qps_1"] / flat["qps_1"] < 5  # a scaled block times like the full Flat


def test_factory_ram_counts_what_a_factory_keeps_in_memory():
    ram = _bench_import("bench_index").factory_ram
    n, d = 1_000_000, 512
    codes = n * (d / 8 + 8)
    assert ram("IVF4096,Flat", n, d) == n * d * 4 + codes
    assert ram("HNSW32", n, d) == n * d * 4 + codes
    assert ram("IVF4096,PQ64x4fsr,RFlat", n, d) == n * d * 4 + codes
    assert ram("IVF4096,PQ64x4fsr,Refine(SQfp16)", n, d) == n * d * 2 + codes
    assert ram("IVF4096,PQ64", n, d) == codes


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_figures(tmp_path):
    """On CUDA: ViT-B-32 bf16 img/s against the anchor and faiss GPU vs CPU are measured."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    bench_gpu = _bench_import("bench_gpu")
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--batches", "5", "--faiss-n", "100000", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    e = res["embed"]
    assert e["device"] == "cuda" and e["images_per_s"] > 0
    assert e["ratio_to_anchor"] == pytest.approx(e["images_per_s"] / 2500.0)
    assert "anchor" in e["anchor"]["what"]
    fa = res["faiss"]
    if "skipped" not in fa:
        flat = next(r for r in fa["rows"] if r["index"] == "Flat")
        assert flat["gpu_recall"] > 0.99 and flat["gpu_over_cpu_qps"] > 0
