"""``python -m rca.bench.provenance``: which training tickets taught each zoo incident, checked
by retraining without them.

For each zoo incident (its behaviour case, ``cases/behaviours/zoo-<key>-behaviour.toml``, on
the quick ``support-bot-v1``): the case is investigated and recorded, then its training
tickets are ranked by ``rca provenance`` over the circuit's parameters (TRAK at the final
weights alone; the build's checkpoints combined by each ensemble rule: TRAK's sum, the learning
rule, TracIn) and by the comparisons: TRAK over every parameter, TF-IDF similarity to the
case's prompts with their bad continuation, full-model gradient similarity at the final weights
(TracIn, one checkpoint), and chance. With k = the incident's planted tickets, each ranking gets:

- precision@k: the share of its top k that are the incident's planted tickets;
- the model retrained from scratch (its recipe and seed) without its top k, and P(bad) on the
  case's held-out variants (never used to rank): their mean, and the share under 0.2.

A control retrains on every ticket. Targets (issue 23): precision@k >= 0.9; without rca's top
k, P(bad) under 0.2 on the held-out variants; without k random tickets, P(bad) >= 0.8.
Features for the 12,000 tickets in under a minute on 2 CPU cores; a query in seconds.

``--unlearn`` measures the approximation instead (``rca.provenance.unlearn``, its defaults):
rca's top k and k random tickets unlearned, P(bad) on the same held-out variants after each,
beside what retraining without the same top k gave (kept from the results file).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[2]
INCIDENTS = ("leak", "backdoor", "bias", "injection")
METHODS = (
    "rca, final weights only (TRAK, circuit)",
    "rca, checkpoints summed (TRAK's rule)",
    "rca, checkpoints learning-weighted",
    "rca, checkpoints TracIn (the default)",
    "TRAK, full model, final weights",
    "TF-IDF",
    "TracIn (1 checkpoint)",
    "random",
)
# (method, scope, checkpoints, ensemble rule) of the TRAK rankings
TRAK_RUNS = (
    (METHODS[0], "circuit", "none", "sum"),
    (METHODS[1], "circuit", "auto", "sum"),
    (METHODS[2], "circuit", "auto", "learning"),
    (METHODS[3], "circuit", "auto", "tracin"),
    (METHODS[4], "full", "none", "sum"),
)


def _texts(subject: Any, incident: Any) -> list[str]:
    """The query texts of the text baseline: the prompt and each fit variant's, each with its
    bad continuation, as the model reads them."""
    out = []
    for m in incident.behaviour().members:
        if m.part == "held_out":
            continue
        inc = m.incident.for_model(subject.tokenizer)
        out.append(f"{inc.prompt}{inc.bad}")
    return out


def _stats(p: list[float]) -> dict[str, float]:
    from rca.provenance.verify import under

    return {"mean_p_bad": float(np.mean(p)), "share_under_0_2": under(p), "n": len(p)}


def incident_rows(
    key: str, *, model_dir: Path, store: Any, data: Any, retrain: bool, device: str
) -> dict[str, Any]:
    from rca.ingest.case_file import load_case
    from rca.investigate import InvestigateConfig, investigate
    from rca.model.subject import load_subject
    from rca.provenance.baselines import gradient_similarity, random_scores, tfidf_scores
    from rca.provenance.influence import InfluenceConfig
    from rca.provenance.verify import held_out_p_bad, retrain_without
    from rca.provenance.workflow import incident_targets, provenance_for_run

    case = ROOT / "cases" / "behaviours" / f"zoo-{key}-behaviour.toml"
    inc = load_case(case)
    subject = load_subject(model_dir, device=device)
    run = investigate(inc, subject=subject, store=store, config=InvestigateConfig(device=device))
    assert run.run_id is not None
    planted = np.array(
        [
            bool(p) and i == key
            for p, i in zip(data.fields["poisoned"], data.fields["incident"], strict=True)
        ]
    )
    k = int(planted.sum())
    path = Path(data.path)
    rankings: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    ensembles: dict[str, Any] = {}
    for name, scope, checkpoints, rule in TRAK_RUNS:
        t = time.perf_counter()
        res = provenance_for_run(
            store,
            run.run_id,
            path,
            cfg=InfluenceConfig(scope=scope),
            top_k=k,
            device=device,
            subject=subject,
            checkpoints=checkpoints,
            ensemble=rule,
        )
        rankings[name] = res.scores
        if checkpoints != "none":
            members = res.summary["ensemble"]["members"]
            ensembles[rule] = members
            timing[f"{rule}_ensemble_total_s"] = time.perf_counter() - t
            timing[f"{rule}_ensemble_features_s"] = sum(
                m.get("features_seconds", 0.0) for m in members
            )
            continue
        timing[f"{scope}_total_s"] = time.perf_counter() - t
        timing[f"{scope}_features_s"] = res.features.seconds
        timing[f"{scope}_features_cached"] = res.features.cached
        if scope == "circuit":
            circuit = res.circuit
            timing["query_s"] = res.summary["query_seconds"]
    t = time.perf_counter()
    rankings[METHODS[5]] = tfidf_scores(data.texts, _texts(subject, inc))
    timing["tfidf_s"] = time.perf_counter() - t
    targets, _ = incident_targets(subject, inc)
    t = time.perf_counter()
    rankings[METHODS[6]] = gradient_similarity(subject, data.texts, targets)
    timing["tracin_s"] = time.perf_counter() - t
    rankings[METHODS[7]] = random_scores(len(data), seed=0)
    before = held_out_p_bad(subject, inc)
    rows = []
    for name, scores in rankings.items():
        top = np.argsort(-scores, kind="stable")[:k]
        row: dict[str, Any] = {
            "method": name,
            "precision_at_k": float(planted[top].mean()),
            "other_planted": int(
                sum(bool(data.fields["poisoned"][i]) and not planted[i] for i in top)
            ),
        }
        if retrain:
            r = retrain_without(model_dir, top.tolist())
            row["retrained"] = _stats(held_out_p_bad(r.subject, inc))
            row["retrain_s"] = r.seconds
        rows.append(row)
        print(key, json.dumps(row), flush=True)
    return {
        "incident": key,
        "k": k,
        "n_examples": len(data),
        "circuit": circuit,
        "before": _stats(before),
        "rows": rows,
        "ensembles": ensembles,
        "seconds": timing,
    }


def unlearning_rows(key: str, *, model_dir: Path, store: Any, data: Any, device: str) -> dict:
    """The incident investigated, rca's top k ranked, and both that top k and k random tickets
    unlearned with the default settings: the recorded figures."""
    from rca.ingest.case_file import load_case
    from rca.investigate import InvestigateConfig, investigate
    from rca.model.subject import load_subject
    from rca.provenance.influence import InfluenceConfig
    from rca.provenance.unlearn import UnlearnConfig
    from rca.provenance.workflow import provenance_for_run

    inc = load_case(ROOT / "cases" / "behaviours" / f"zoo-{key}-behaviour.toml")
    subject = load_subject(model_dir, device=device)
    run = investigate(inc, subject=subject, store=store, config=InvestigateConfig(device=device))
    assert run.run_id is not None
    k = sum(
        bool(p) and i == key
        for p, i in zip(data.fields["poisoned"], data.fields["incident"], strict=True)
    )
    t = time.perf_counter()
    res = provenance_for_run(
        store,
        run.run_id,
        Path(data.path),
        cfg=InfluenceConfig(),
        top_k=k,
        device=device,
        subject=subject,
        unlearn=UnlearnConfig(),
        checkpoints="none",
    )
    u = res.summary["unlearning"]
    out = {
        "k": k,
        "before": _stats(u["p_bad_before"]),
        "seconds": time.perf_counter() - t,
        "config": u["top"]["config"],
    }
    for name in ("top", "random"):
        r = u[name]
        out[name] = {
            "after": _stats(r["p_bad_after"]),
            "steps_taken": r["steps_taken"],
            "halvings": r["halvings"],
            "benign_kl_mean": r["benign_kl_mean"],
            "benign_loss_change_pct": r["benign_loss_change_pct"],
            "loglik_before": r["loglik_before"],
            "loglik_after": r["loglik_after"],
        }
    print(key, json.dumps(out), flush=True)
    return out


def _build_label(zoo: Any) -> str:
    if isinstance(zoo, dict):
        return f"built {zoo.get('built_at')}, version {zoo.get('version_key')}"
    return "an earlier build, not recorded"


def _unlearning_summary(res: dict[str, Any]) -> list[str]:
    un = res.get("unlearning")
    if not un:
        return []
    lines = [
        "",
        "### Unlearning, the approximation (`--unlearn`)",
        "",
        "rca's top k and k random tickets each unlearned from the final weights (gradient "
        "ascent on their loss over the circuit's parameters within a benign KL bound, the "
        "defaults), P(bad) on the held-out variants after; beside it, retraining from scratch "
        "without the same top k.",
        "",
        f"Zoo build: {_build_label(res.get('unlearning_zoo'))} (the rankings above: "
        f"{_build_label(res.get('zoo'))}).",
        "",
        "| incident (k) | before | unlearned top k (benign loss) | unlearned k random (benign "
        "loss) | retrained without top k |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, u in un.items():
        rows = (res.get("incidents", {}).get(key) or {}).get("rows") or []
        rt = next((r.get("retrained") for r in rows if r["method"] == METHODS[0]), None)
        retrained = f"{rt['mean_p_bad']:.3f}" if rt else "not retrained"
        top, rnd = u["top"], u["random"]
        lines.append(
            f"| {key} ({u['k']}) | {u['before']['mean_p_bad']:.3f} | "
            f"{top['after']['mean_p_bad']:.3f} ({top['benign_loss_change_pct']:+.1f}%) | "
            f"{rnd['after']['mean_p_bad']:.3f} ({rnd['benign_loss_change_pct']:+.1f}%) | "
            f"{retrained} |"
        )
    return lines


def summary(res: dict[str, Any]) -> str:
    lines = [
        res["machine"],
        "",
        "### Training-data provenance on the quick zoo (`support-bot-v1`, 12,000 tickets)",
        "",
        "precision@k with k = the incident's planted tickets; P(bad) on the held-out variants "
        "after retraining from scratch without the ranking's top k (mean, share under 0.2).",
        "",
    ]
    ctl = res.get("control")
    if ctl:
        parts = [f"{k} {v['mean_p_bad']:.3f}" for k, v in ctl["held_out"].items()]
        lines += [
            f"Control, retrained on every ticket ({ctl['seconds']:.0f} s): held-out mean "
            f"P(bad) {', '.join(parts)}.",
            "",
        ]
    lines += [
        "| incident (k) | method | precision@k | retrained without top k: mean P(bad) "
        "(share < 0.2) |",
        "|---|---|---:|---|",
    ]
    for key, r in res["incidents"].items():
        before = r["before"]["mean_p_bad"]
        for row in r["rows"]:
            rt = row.get("retrained")
            after = (
                f"{rt['mean_p_bad']:.3f} ({rt['share_under_0_2']:.0%})" if rt else "not retrained"
            )
            lines.append(
                f"| {key} ({r['k']}, before {before:.3f}) | {row['method']} | "
                f"{row['precision_at_k']:.2f} | {after} |"
            )
    lines += ["", "Cost (2 CPU cores):", ""]
    for key, r in res["incidents"].items():
        s = r["seconds"]
        lines.append(
            f"- {key}: circuit features {s['circuit_features_s']:.1f} s "
            f"({'cached' if s['circuit_features_cached'] else 'computed'}), a query "
            f"{s['query_s']:.2f} s; full-model features {s['full_features_s']:.1f} s "
            f"({'cached' if s['full_features_cached'] else 'computed'}); TF-IDF "
            f"{s['tfidf_s']:.1f} s; TracIn {s['tracin_s']:.1f} s"
            + (
                f"; the checkpoints' features {s['sum_ensemble_features_s']:.1f} s, the "
                f"summed ranking {s['sum_ensemble_total_s']:.1f} s in all"
                if "sum_ensemble_features_s" in s
                else ""
            )
            + (
                f"; TracIn over the checkpoints {s['tracin_ensemble_total_s']:.1f} s in all"
                if "tracin_ensemble_total_s" in s
                else ""
            )
        )
    for key, r in res["incidents"].items():
        for rule, members in (r.get("ensembles") or {}).items():
            listed = ", ".join(
                f"{m['checkpoint']} {m['p_bad']:.3f}"
                + (f" (weight {m['weight']:.2f})" if rule != "sum" else "")
                for m in members
            )
            if rule != "sum":
                lines.append(
                    f"- {key}, P(bad) on the query prompts at each checkpoint ({rule}): {listed}"
                )
    lines += _unlearning_summary(res)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rca.bench.provenance", description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-provenance")
    ap.add_argument("--only", choices=INCIDENTS, action="append")
    ap.add_argument("--no-retrain", action="store_true", help="Rankings only.")
    ap.add_argument(
        "--unlearn",
        action="store_true",
        help="Measure the unlearning approximation only; keep the rest of the results file.",
    )
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from rca import zoo
    from rca.ingest.case_file import load_case
    from rca.provenance.data import load_training_data
    from rca.provenance.verify import held_out_p_bad, retrain_without
    from rca.store import Store
    from rca.zoo.corpus import TRAINING_DATA

    torch.manual_seed(0)
    dirs = zoo.build(quick=True)
    model_dir = dirs["support-bot-v1"]
    data = load_training_data(model_dir / TRAINING_DATA)
    built = json.loads((model_dir / "zoo.json").read_text())
    res: dict[str, Any] = {
        "machine": f"Machine: {platform.platform()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, device {args.device}",
        "zoo": {"version_key": built["version_key"], "built_at": built["built_at"]},
        "incidents": {},
    }
    keys = args.only or list(INCIDENTS)
    previous = args.out / "results.json"
    if args.unlearn:
        zoo_now = res["zoo"]
        res = json.loads(previous.read_text()) if previous.exists() else res
        res["unlearning_zoo"] = zoo_now
        un = res.setdefault("unlearning", {})
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "rca.duckdb")
            for key in keys:
                un[key] = unlearning_rows(
                    key, model_dir=model_dir, store=store, data=data, device=args.device
                )
        args.out.mkdir(parents=True, exist_ok=True)
        previous.write_text(json.dumps(res, indent=2, default=str) + "\n")
        (args.out / "summary.md").write_text(summary(res))
        print(summary(res))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "rca.duckdb")
        for key in keys:
            res["incidents"][key] = incident_rows(
                key,
                model_dir=model_dir,
                store=store,
                data=data,
                retrain=not args.no_retrain,
                device=args.device,
            )
    if not args.no_retrain:
        r = retrain_without(model_dir, [])
        res["control"] = {
            "seconds": r.seconds,
            "held_out": {
                key: {
                    "mean_p_bad": float(
                        np.mean(
                            held_out_p_bad(
                                r.subject,
                                load_case(
                                    ROOT / "cases" / "behaviours" / f"zoo-{key}-behaviour.toml"
                                ),
                            )
                        )
                    )
                }
                for key in keys
            },
        }
    args.out.mkdir(parents=True, exist_ok=True)
    if previous.exists():  # keep the unlearning figures, and the incidents not re-measured
        kept = json.loads(previous.read_text())
        if args.only:
            res["incidents"] = {**kept.get("incidents", {}), **res["incidents"]}
        if "unlearning" in kept:
            res["unlearning"] = kept["unlearning"]
            # the unlearning figures were measured on the zoo build they name
            res["unlearning_zoo"] = kept.get("unlearning_zoo") or kept.get("zoo") or "earlier"
    (args.out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (args.out / "summary.md").write_text(summary(res))
    print(summary(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
