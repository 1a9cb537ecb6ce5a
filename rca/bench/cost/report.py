"""The cost benchmarks' report: ``summary`` (the Markdown tables docs/benchmarks.md carries)
and ``plots`` (``trace_ratio.png``, ``speedups.png``), from the results a run writes.

A run of one section (``--only``) leaves the others empty: their tables are left out. Rows
measured on CUDA get tables of their own after the CPU's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rca.bench.cost.common import CONFIGS
from rca.bench.cost.real import REAL_TARGET_GB, REAL_TARGET_S, REAL_TARGET_TOKENS

__all__ = ["STAGES", "plots", "summary"]


def plots(res: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    if not [r for r in res["trace"] if "error" not in r]:
        return files  # a run of other sections only (--only)
    fig, ax = plt.subplots(figsize=(6, 4))
    for device, style in (("cpu", "o-"), ("cuda", "s--")):
        on = [r for r in _on(res["trace"], device) if "error" not in r]
        for cfg in sorted({r["config"] for r in on}, key=lambda c: CONFIGS[c]):
            rows = sorted((r for r in on if r["config"] == cfg), key=lambda r: r["length"])
            label = cfg if device == "cpu" else f"{cfg} (CUDA)"
            ratios = [r["atp_edges_ratio"] for r in rows]
            ax.plot([r["length"] for r in rows], ratios, style, label=label)
    ax.axhline(1.5, color="grey", ls="--", lw=1, label="target 1.5x")
    ax.set_xscale("log")
    lengths = sorted({r["length"] for r in res["trace"] if "error" not in r})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("AtP node+edge trace / forward+backward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "trace_ratio.png", dpi=110)
    files.append("trace_ratio.png")
    plt.close(fig)
    alts = [r for r in res["alternatives"] if "error" not in r]
    if alts:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [
            f"{r['config']}@{r['length']}" + (" CUDA" if r.get("device") == "cuda" else "")
            for r in alts
        ]
        x = range(len(alts))
        w = 0.27
        ax.bar(
            [i - w for i in x], [r["speedup_nodes_vs_atp_nodes"] for r in alts], w, label="nodes"
        )
        ax.bar(list(x), [r["speedup_edges_vs_atp_edges"] for r in alts], w, label="edges (extrap.)")
        ax.bar(
            [i + w for i in x], [r["speedup_vs_captum_lig"] for r in alts], w, label="captum LIG"
        )
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels, rotation=30)
        ax.set_ylabel("speed-up of rca's AtP trace")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "speedups.png", dpi=110)
        files.append("speedups.png")
        plt.close(fig)
    return files


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _on(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The rows measured on ``device`` (rows from before devices were recorded are CPU)."""
    return [r for r in rows if r.get("device", "cpu") == device]


def _trace_lines(rows: list[dict[str, Any]], cuda: bool) -> list[str]:
    where = " on CUDA" if cuda else ""
    mem = "peak CUDA allocated MB" if cuda else "peak RSS MB"
    lines = [
        f"### Trace cost{where} (ratio to one forward+backward; target: node + edge <= 1.5)",
        "",
        "| model | tokens | fwd+bwd s | AtP nodes | AtP nodes+edges | EAP-IG nodes | "
        f"EAP-IG nodes+edges | {mem} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['n']} | error: {r['error']} | | | | | |")
            continue
        peak = r["peak_cuda_allocated_mb"] if cuda else r["peak_rss_mb"]
        lines.append(
            f"| {r['config']} | {r['length']} | {r['forward_backward_s']:.4f} | "
            f"{r['atp_nodes_ratio']:.2f} | {r['atp_edges_ratio']:.2f} | "
            f"{r['eap-ig_nodes_ratio']:.2f} | {r['eap-ig_edges_ratio']:.2f} | {peak:.0f} |"
        )
    return lines


def _alternatives_lines(rows: list[dict[str, Any]], cuda: bool) -> list[str]:
    where = " on CUDA" if cuda else ""
    lines = [
        "",
        f"### Against the alternatives{where} (target: >= 30x nodes, >= 1000x edges on "
        "12x768 @ 128)",
        "",
        "| model | tokens | exhaustive nodes s | AtP nodes s | speed-up | exhaustive edges s "
        "(extrapolated) | AtP edges s | speed-up | captum LIG s (extrapolated) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            continue
        lines.append(
            f"| {r['config']} | {r['length']} | {r['exhaustive_nodes_s']:.2f} | "
            f"{r['rca_atp_nodes_s']:.3f} | {r['speedup_nodes_vs_atp_nodes']:.0f}x | "
            f"{r['exhaustive_edges_s_extrapolated']:.0f} ({r['exhaustive_edges_count']} edges) | "
            f"{r['rca_atp_edges_s']:.3f} | {r['speedup_edges_vs_atp_edges']:.0f}x | "
            f"{r['captum_lig_s_extrapolated']:.2f} | {r['speedup_vs_captum_lig']:.0f}x |"
        )
    return lines


def _ablation_lines(rows: list[dict[str, Any]], cuda: bool) -> list[str]:
    if cuda:  # the GPU target is on all 256 sets together
        head = "### Ablation on CUDA (256 single-component sets; target: <= 5 forwards for all)"
        col = "256 sets / forward"
    else:
        head = "### Ablation (256 single-component sets; target on CPU: <= 0.6 forward per set)"
        col = "per set / forward"
    lines = [
        "",
        head,
        "",
        f"| model | tokens | forward s | batched s | {col} | sequential s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            continue
        ratio = r["batched_s"] / r["forward_s"] if cuda else r["batched_per_set_over_forward"]
        lines.append(
            f"| {r['config']} | {r['length']} | {r['forward_s']:.4f} | {r['batched_s']:.2f} | "
            f"{ratio:.2f} | {r['sequential_s_extrapolated_from_64']:.2f} | "
            f"{r['speedup_vs_sequential']:.1f}x |"
        )
    return lines


def _investigation_lines(rows: list[dict[str, Any]], cuda: bool) -> list[str]:
    lines: list[str] = []
    for r in rows:
        if "error" in r:
            lines += ["", f"Investigation{' on CUDA' if cuda else ''}: error {r['error']}"]
            continue
        st = ", ".join(f"{k} {v:.1f} s" for k, v in r["stages_s"].items())
        if r.get("trace_stages_s"):
            inner = ", ".join(f"{k} {v:.1f} s" for k, v in r["trace_stages_s"].items())
            st += f"; the trace: {inner}"
        target = "" if cuda else " (target: <= 60 s, peak RSS <= 3 GB)"
        mem = f"peak RSS {r['peak_rss_mb']:.0f} MB"
        if cuda:
            mem += f", peak CUDA allocated {r['peak_cuda_allocated_mb']:.0f} MB"
        lines += [
            "",
            f"### Full investigation{' on CUDA' if cuda else ''}, {r['config']} at "
            f"{r['length']} tokens{target}",
            "",
            f"{r['wall_s']:.1f} s wall ({st}); {mem}; {r['rows_written']} rows recorded; "
            f"recording {100 * r['record_share']:.1f}% of the wall time.",
        ]
    return lines


def _real_lines(rows: list[dict[str, Any]], cuda: bool) -> list[str]:
    if not rows:
        return []
    where = " on CUDA" if cuda else " on the CPU"
    target = (
        ""
        if cuda
        else f" (target: <= {REAL_TARGET_S:.0f} s and <= {REAL_TARGET_GB:.0f} GB for <= "
        f"{REAL_TARGET_TOKENS} tokens)"
    )
    lines = [
        "",
        f"### Real model: SmolLM2-135M-Instruct, a full investigation of each real case{where}"
        f"{target}",
        "",
        "| case | tokens | wall s | ingest | trace | confirm | remedy | record | peak RSS MB "
        "| confirm fwd-eq (circuit) | verdict, cause set |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | | | | | | | | | | error: {r['error']} |")
            continue
        st = r["stages_s"]
        lines.append(
            f"| {r['config']} | {r['length']} | {r['wall_s']:.1f} | "
            + " | ".join(f"{st.get(k, 0.0):.1f}" for k in STAGES)
            + f" | {r['peak_rss_mb']:.0f} | {r.get('confirm_forward_equiv') or 0:.0f} "
            f"({r.get('circuit_forward_equiv') or 0:.0f}) | {r['verdict']}, "
            f"{', '.join(r['cause_set'])} |"
        )
    return lines


STAGES = ("ingest", "trace", "confirm", "remedy", "record")


def _natural_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        head = "### Natural incidents: IOI on SmolLM2-135M-Instruct, exact direct effects"
        if "error" in r:
            lines += ["", head, "", f"error: {r['error']}"]
            continue
        s = r["summary"]
        lines += [
            "",
            f"{head} ({r['device']})",
            "",
            f"{r['n']} incidents, {r['wall_s']:.0f} s in all, peak RSS {r['peak_rss_mb']:.0f} MB. "
            f"rca's top writer is in the exact top 3 by direct effect in "
            f"{s.get('top_writer_in_exact_top3', 0)} of {s.get('with_writer', 0)} incidents with "
            f"a writer; the cause set holds infrastructure in {s.get('infra_in_set', 0)} of "
            f"{s.get('n_verdicts', 0)}. Per incident: {r['config']}/natural.md.",
        ]
    return lines


def _fix_cells(r: dict[str, Any]) -> tuple[str, str]:
    """A behaviour row's recommended fix on the held-out variants (its share under the target,
    mean P(bad) after, and before; its benign loss change), and the one-prompt fix on the same
    variants."""
    rec = next((f for f in r["fixes"] if f["recommended"]), None)
    held = (
        "none recommended"
        if rec is None
        else f"{rec['kind']}: {rec['held_out_share']:.0%} ({rec['held_out_mean_p_bad']:.3f}, "
        f"{r['held_out_p_bad_before']:.3f}), loss {rec['loss_change_pct']:+.1f}%"
    )
    one = r.get("single_on_held_out")
    one_s = (
        "-"
        if one is None
        else f"{r['single_recommended']}: {one['share_under_target']:.0%} "
        f"({one['mean_p_bad_after']:.3f})"
        + (f", loss {one['loss_change_pct']:+.1f}%" if "loss_change_pct" in one else "")
    )
    return held, one_s


def _behaviour_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "### The zoo's incidents as behaviours: each incident's prompt and its listed variants "
        "(targets: the fix holds under 0.2 on >= 90% of held-out variants at < 5% benign loss; "
        "<= 5x one prompt)",
        "",
        "| incident | variants (held out) | one prompt s | behaviour s | ratio | recommended: "
        "held out under 0.2 (mean P(bad), before), benign loss | the one-prompt fix on them |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('config')} | | | | | error: {r['error']} | |")
            continue
        held, one_s = _fix_cells(r)
        lines.append(
            f"| {r['config']} | {r['n_variants']} ({r['held_out']}) | {r['single_s']:.1f} | "
            f"{r['behaviour_s']:.1f} | {r['ratio']:.1f} | {held} | {one_s} |"
        )
    return lines


def _real_behaviour_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "### Real cases as behaviours: SmolLM2-135M-Instruct, each case's prompt and its variants",
        "",
        "| case | variants (held out, shown) | one prompt s | behaviour s | ratio | cause set "
        "holds on | recommended: held out under 0.2 (mean P(bad), before) | the one-prompt "
        "fix on them |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | | | | | | error: {r['error']} | |")
            continue
        held, one_s = _fix_cells(r)
        holds = "-" if r.get("set_holds") is None else f"{r['set_holds']:.0%}"
        lines.append(
            f"| {r['config']} | {r['n_variants']} ({r['held_out']}, {r['shown']}) | "
            f"{r['single_s']:.0f} | {r['behaviour_s']:.0f} | {r['ratio']:.1f} | {holds} | "
            f"{held} | {one_s} |"
        )
    return lines


def summary(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m.get('memory_gib', '?')} GiB, "
        f"torch {m['torch']} on {m['threads']} threads, CUDA: {m['cuda'] or 'none'}.",
        "",
    ]
    # a run of one section (--only) leaves the others empty: their tables are left out
    if res["trace"]:
        lines += _trace_lines(_on(res["trace"], "cpu"), False)
    if res["alternatives"]:
        lines += _alternatives_lines(_on(res["alternatives"], "cpu"), False)
    if res["ablation"]:
        lines += _ablation_lines(_on(res["ablation"], "cpu"), False)
    lines += _investigation_lines(_on(res["investigation"], "cpu"), False)
    lines += _real_lines(_on(res.get("real", []), "cpu"), False)
    lines += _natural_lines(res.get("natural", []))
    lines += _behaviour_lines(res.get("behaviour", []))
    lines += _real_behaviour_lines(res.get("real_behaviour", []))
    for r in res.get("store", []):
        if "error" in r:
            continue
        lines += [
            "",
            f"### Store (target: >= 1M rows/s): {r['rows']:,} edge rows in one run, "
            f"{r['seconds']:.2f} s, {r['rows_per_s']:,.0f} rows/s.",
        ]
    acc = res.get("accuracy")
    if acc:
        lines += [
            "",
            f"### Accuracy: localization, {acc['n_faults']} faults: confirm AC@1 {acc['ac1']}, "
            f"AC@3 {acc['ac3']}; attribution only {acc['attribution_only']['ac1']} / "
            f"{acc['attribution_only']['ac3']}; exhaustive patching {acc['exhaustive']['ac1']} / "
            f"{acc['exhaustive']['ac3']}.",
        ]
    if any(_on(res[k], "cuda") for k in ("trace", "alternatives", "ablation", "investigation")):
        lines += ["", f"## On CUDA: {m['cuda']}", ""]
        lines += _trace_lines(_on(res["trace"], "cuda"), True)
        lines += _alternatives_lines(_on(res["alternatives"], "cuda"), True)
        lines += _ablation_lines(_on(res["ablation"], "cuda"), True)
        lines += _investigation_lines(_on(res["investigation"], "cuda"), True)
        lines += _real_lines(_on(res.get("real", []), "cuda"), True)
    return "\n".join(lines) + "\n"
