"""The cost benchmarks' smoke run (the smallest model, 16 tokens), as CI runs it.

No timing is asserted (timings belong in docs/benchmarks.md); this checks that every section
runs and reports what it claims to: each measurement present and without error, the plots and
the summary written, the investigation really recorded rows, and the ablation benchmark ran
its 256 sets.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench_module():
    spec = importlib.util.spec_from_file_location("rca_benchmarks_run", ROOT / "benchmarks/run.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_reports_every_section(tmp_path: Path) -> None:
    bench = _bench_module()
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["smoke"] is True and res["machine"]["cpu_count"] >= 1
    for section in ("trace", "alternatives", "ablation", "investigation", "store"):
        assert res[section], section
        for row in res[section]:
            assert "error" not in row, (section, row)
    tr = res["trace"][0]
    for key in ("atp_nodes_ratio", "atp_edges_ratio", "eap-ig_nodes_ratio", "eap-ig_edges_ratio"):
        assert tr[key] > 0
    # EAP-IG runs 8 interpolation steps where AtP runs one: it must cost more passes
    assert tr["eap-ig_edges_forward_equiv"] > tr["atp_edges_forward_equiv"]
    alt = res["alternatives"][0]
    assert alt["exhaustive_nodes_forwards"] == tr["components"]
    assert alt["exhaustive_edges_count"] > alt["exhaustive_nodes_forwards"]
    assert res["ablation"][0]["sets"] == 256
    assert res["investigation"][0]["rows_written"] > 0
    assert res["store"][0]["rows"] == 10_000
    for png in ("trace_ratio.png", "speedups.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "summary.md").read_text()
    assert "Trace cost" in summary and "target" in summary
    # every row says where it ran; without a GPU that is the CPU alone
    assert res["devices"] == ["cpu"]
    for section in ("trace", "alternatives", "ablation", "investigation"):
        assert {row["device"] for row in res[section]} == {"cpu"}, section
    assert "On CUDA" not in summary

    # CUDA rows (as a GPU machine's run writes them) get their own tables, the ablation's
    # ratio taken over all 256 sets, as the GPU target reads
    cuda = dict(res, machine=dict(res["machine"], cuda="a GPU"))
    for section in ("trace", "alternatives", "ablation", "investigation"):
        cuda[section] = res[section] + [
            dict(row, device="cuda", peak_cuda_allocated_mb=123.0) for row in res[section]
        ]
    text = bench.summary(cuda)
    assert "## On CUDA: a GPU" in text
    cpu_part, cuda_part = text.split("## On CUDA")
    abl = res["ablation"][0]
    assert f"| {abl['batched_s'] / abl['forward_s']:.2f} |" in cuda_part
    assert f"| {abl['batched_per_set_over_forward']:.2f} |" in cpu_part
    assert "peak CUDA allocated MB" in cuda_part and "| 123 |" in cuda_part
    assert cpu_part.count("### Trace cost") == 1 and cuda_part.count("### Trace cost") == 1


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        return  # a GPU machine runs the CUDA rows instead
    bench = _bench_module()
    assert bench.main(["--smoke", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda" in err and "--device cpu" in err
