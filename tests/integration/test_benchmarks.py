"""The cost benchmarks' smoke run (the smallest model, 16 tokens), as CI runs it.

No timing target is asserted (timings belong in docs/benchmarks.md): a shared CI machine's
clock says little. What each section reports must hold as a measurement:

- every section runs without error and reports a positive time and peak memory;
- the ratios and speed-ups it reports are its own times divided as it says;
- the trace's counted cost (forward-pass equivalents, which do not depend on the machine) is
  within the documented bound of 1.5 forward+backward passes for AtP's nodes and edges, and
  EAP-IG's eight steps cost more;
- exhaustive patching runs one forward per head and MLP, and counts the edges between
  components of different layers (and to the logits);
- the ablation ran its 256 sets, each at most one forward (reuse of the layers below);
- the investigation's stages account for its wall time, it recorded rows, and recording's
  share is the record stage over the wall time;
- CUDA rows (as a GPU machine's run writes them) get a section of their own after the CPU's,
  which they leave as it was.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rca.bench import cost

ROOT = Path(__file__).resolve().parents[2]
FWD_BWD = 3.0  # one forward + one backward, in forward-pass equivalents
TRACE_BOUND = 1.5  # docs/benchmarks.md: node + edge trace <= 1.5 x one forward+backward


def _positive(row: dict[str, Any], *keys: str) -> None:
    for k in keys:
        assert math.isfinite(row[k]) and row[k] > 0, (k, row[k])


def _stages_account_for_wall(row: dict[str, Any]) -> None:
    """The stages' times sum to the wall time, less what runs between them (each stage's time
    includes releasing the memory it leaves, a garbage collection whose cost grows with the
    process's heap)."""
    stages = sum(row["stages_s"].values())
    assert 0 <= row["wall_s"] - stages <= 0.05 * row["wall_s"] + 0.5, (row["wall_s"], stages)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-smoke")
    assert cost.main(["--smoke", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text()), out


def test_every_section_reports_a_time_and_its_memory(smoke) -> None:
    res, out = smoke
    assert res["smoke"] is True and res["machine"]["cpu_count"] >= 1
    assert res["devices"] == ["cpu"] or res["devices"] == ["cpu", "cuda"]
    for section in ("trace", "alternatives", "ablation", "investigation", "store"):
        assert res[section], section
        for row in res[section]:
            assert "error" not in row, (section, row)
            _positive(row, "peak_rss_mb")
    for row in res["trace"]:
        _positive(row, "forward_s", "forward_backward_s", "atp_nodes_s", "eap-ig_edges_s")
    for row in res["alternatives"]:
        _positive(row, "exhaustive_nodes_s", "rca_atp_nodes_s", "captum_lig_s_extrapolated")
    for row in res["ablation"]:
        _positive(row, "forward_s", "batched_s", "sequential_s_extrapolated_from_64")
    for row in res["investigation"]:
        _positive(row, "wall_s")
    for row in res["store"]:
        _positive(row, "seconds", "rows_per_s")
        assert row["rows"] == 10_000
        assert row["rows_per_s"] == pytest.approx(row["rows"] / row["seconds"])
    for png in ("trace_ratio.png", "speedups.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "summary.md").read_text() == cost.summary(res)


def test_the_trace_costs_what_its_ratios_say_within_the_documented_bound(smoke) -> None:
    res, _ = smoke
    for tr in res["trace"]:
        for key in ("atp_nodes", "atp_edges", "eap-ig_nodes", "eap-ig_edges"):
            assert tr[f"{key}_ratio"] == pytest.approx(tr[f"{key}_s"] / tr["forward_backward_s"])
        for key in ("atp_nodes", "atp_edges"):
            assert tr[f"{key}_forward_equiv"] <= TRACE_BOUND * FWD_BWD, (key, tr)
        # EAP-IG runs 8 interpolation steps where AtP runs one: it must cost more passes
        assert tr["eap-ig_edges_forward_equiv"] > tr["atp_edges_forward_equiv"]


def test_the_alternatives_patch_every_component_and_edge(smoke) -> None:
    res, _ = smoke
    tr = res["trace"][0]
    n_layers, _, n_heads = cost.common.CONFIGS[tr["config"]]
    per_layer = n_heads + 1  # heads and the MLP
    for alt in res["alternatives"]:
        assert alt["exhaustive_nodes_forwards"] == tr["components"] == n_layers * per_layer
        cross_layer = per_layer**2 * n_layers * (n_layers - 1) // 2
        assert alt["exhaustive_edges_count"] == cross_layer + n_layers * per_layer
        per_forward = alt["exhaustive_nodes_s"] / alt["exhaustive_nodes_forwards"]
        assert alt["exhaustive_edges_s_extrapolated"] == pytest.approx(
            per_forward * alt["exhaustive_edges_count"]
        )
        assert alt["speedup_nodes_vs_atp_nodes"] == pytest.approx(
            alt["exhaustive_nodes_s"] / alt["rca_atp_nodes_s"]
        )


def test_the_ablation_runs_every_set_reusing_the_layers_below(smoke) -> None:
    res, _ = smoke
    for abl in res["ablation"]:
        assert abl["sets"] == 256
        assert 0 < abl["batched_forward_equiv_per_set"] <= 1.0
        assert abl["batched_per_set_over_forward"] == pytest.approx(
            abl["batched_s"] / 256 / abl["forward_s"]
        )
        assert abl["speedup_vs_sequential"] == pytest.approx(
            abl["sequential_s_extrapolated_from_64"] / abl["batched_s"]
        )


def test_the_investigation_is_timed_by_stage_and_records_rows(smoke) -> None:
    res, _ = smoke
    for inv in res["investigation"]:
        assert inv["rows_written"] > 0
        assert set(inv["stages_s"]) <= set(cost.report.STAGES)
        _stages_account_for_wall(inv)
        assert inv["record_share"] == pytest.approx(inv["stages_s"]["record"] / inv["wall_s"])


def test_cuda_rows_get_a_section_of_their_own(smoke) -> None:
    res, _ = smoke
    sections = ("trace", "alternatives", "ablation", "investigation")
    cpu = dict(res, machine=dict(res["machine"], cuda=None))
    for section in sections:
        cpu[section] = [row for row in res[section] if row.get("device", "cpu") == "cpu"]
    cpu_text = cost.summary(cpu)
    assert "On CUDA" not in cpu_text
    cuda = dict(cpu, machine=dict(res["machine"], cuda="a GPU"))
    for section in sections:
        cuda[section] = cpu[section] + [
            dict(row, device="cuda", peak_cuda_allocated_mb=123.0) for row in cpu[section]
        ]
    text = cost.summary(cuda)
    cpu_part, cuda_part = text.split("## On CUDA: a GPU")
    # the CPU's tables are as they were (the machine line names the GPU)
    assert cpu_part.rstrip("\n").splitlines()[1:] == cpu_text.rstrip("\n").splitlines()[1:]
    # the CUDA ablation's ratio is over all 256 sets together, as the GPU target reads
    abl = cpu["ablation"][0]
    assert f"{abl['batched_s'] / abl['forward_s']:.2f}" in cuda_part


@pytest.mark.real
@pytest.mark.slow
def test_a_real_cases_stages_account_for_its_wall_time(tmp_path: Path) -> None:
    """One real case investigated as ``--only real`` does, in its own process."""
    cmd = [sys.executable, "-m", "rca.bench.cost", "--one", "real", "capital", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    row = json.loads(r.stdout.strip().splitlines()[-1])
    _positive(row, "wall_s", "load_s", "peak_rss_mb")
    assert set(row["stages_s"]) == set(cost.report.STAGES)
    _stages_account_for_wall(row)


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        return  # a GPU machine runs the CUDA rows instead
    assert cost.main(["--smoke", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda" in err and "--device cpu" in err


def test_the_script_and_the_module_are_one_command() -> None:
    for cmd in (["benchmarks/run.py"], ["-m", "rca.bench.cost"]):
        r = subprocess.run(
            [sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=ROOT, check=True
        )
        assert "--smoke" in r.stdout and "--only" in r.stdout
