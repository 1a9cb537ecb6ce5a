"""``rca provenance`` on the quick zoo, as docs/provenance.md walks it: the injection behaviour
investigated and recorded, its training tickets ranked over its circuit's parameters, the top
recorded in one transaction and shown again without --data; the planted tickets come first;
the features are cached and reused; bad input is one line and exit code 2, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rca.store import Store
from tests.helpers import assert_one_line_error, rca_cli_named

CASES = Path(__file__).resolve().parents[2] / "cases"


rca = rca_cli_named


@pytest.fixture(scope="module")
def ranked(zoo_home: Path, zoo_models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("provenance_cli")
    db, cache = tmp / "rca.duckdb", tmp / "cache"
    home = ("--home", str(zoo_home))
    case = str(CASES / "behaviours" / "zoo-injection-behaviour.toml")
    code, _, err = rca("investigate", case, "--db", str(db), "--device", "cpu", *home)
    assert code == 0, err
    data = zoo_models["support-bot-v1"] / "training_data.jsonl"
    args = ["provenance", "zoo-injection-behaviour", "--data", str(data), "--limit", "3000"]
    args += ["--top", "40", "--db", str(db), "--cache", str(cache), "--json", *home]
    args += ["--checkpoints", "none"]  # the model alone; the ensemble has its own test
    code, out, err = rca(*args)
    assert code == 0, err
    again = rca(*args)
    return {"db": db, "cache": cache, "data": data, "home": home, "first": json.loads(out),
            "again": again}  # fmt: skip


def test_the_planted_tickets_rank_first_and_are_recorded(ranked: dict) -> None:
    first = ranked["first"]
    top = first["examples"]
    assert len(top) == 40 and [e["score"] for e in top] == sorted(
        (e["score"] for e in top), reverse=True
    )
    planted = [e for e in top if e["fields"]["poisoned"] and e["fields"]["incident"] == "injection"]
    # about 50 of the first 3,000 tickets are the injection's (1.7%)
    assert len(planted) >= 30, [e["text"] for e in top]
    assert first["circuit"] and first["queries"]["n"] > 1  # the prompt and its fit variants
    assert first["features"]["n"] == 3000 and first["features"]["scope"] == "circuit"
    # the default rule without checkpoints: the final weights' TRAK scores, no ensemble
    assert first["method"] == "trak-circuit" and "ensemble" not in first["summary"]
    assert (Path(first["features"]["path"]) / "features.parquet").is_file()
    row = Store.reader(ranked["db"]).get_provenance(first["query_id"])
    assert [e["example_index"] for e in row["examples"]] == [e["index"] for e in top]
    assert row["features"]["cache_key"] == first["features"]["key"]
    assert Store.reader(ranked["db"]).verify().ok


def test_a_second_query_reuses_the_features(ranked: dict) -> None:
    code, out, err = ranked["again"]
    assert code == 0, err
    again = json.loads(out)
    assert again["summary"]["features_cached"] and not ranked["first"]["summary"]["features_cached"]
    assert [e["index"] for e in again["examples"]] == [
        e["index"] for e in ranked["first"]["examples"]
    ]
    assert len(list(ranked["cache"].iterdir())) == 1
    reader = Store.reader(ranked["db"])
    assert reader.counts()["influence_features"] == 1 and reader.counts()["provenance"] == 2


def test_without_data_it_shows_the_recorded_ranking(ranked: dict) -> None:
    code, out, err = rca(
        "provenance", "zoo-injection-behaviour", "--db", str(ranked["db"]), "--top", "3"
    )
    assert code == 0, err
    assert "the top 3 by influence" in out and "ignore previous instructions" in out


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--proj-dim", "64"], ["--proj-dim", "101 to 8192"]),
        (["--top", "0"], ["--top"]),
        (["--scope", "heads"], ["scope", "circuit or full"]),
        (["--text-field", "body"], ["body"]),
        (["--unlearn", "--unlearn-steps", "0"], ["--unlearn-steps"]),
        (["--unlearn", "--unlearn-kl", "-1"], ["--unlearn-kl"]),
        (["--ensemble", "max"], ["--ensemble", "sum, learning"]),
        (["--checkpoints", "/no/such/ckpt"], ["--checkpoints", "/no/such/ckpt"]),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(ranked: dict, extra, needles) -> None:
    before = Store.reader(ranked["db"]).counts()
    args = ["provenance", "zoo-injection-behaviour", "--data", str(ranked["data"])]
    code, _, err = rca(*args, "--db", str(ranked["db"]), *ranked["home"], *extra)
    assert_one_line_error(code, err, *needles)
    assert Store.reader(ranked["db"]).counts() == before


def test_bad_data_and_unknown_runs_are_one_line(ranked: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    db = str(ranked["db"])
    code, _, err = rca("provenance", "zoo-injection-behaviour", "--data", str(bad), "--db", db)
    assert_one_line_error(code, err, "line 2", "text")
    code, _, err = rca("provenance", "no-such-case", "--data", str(bad), "--db", db)
    assert_one_line_error(code, err, "no-such-case")
    code, _, err = rca("provenance", "zoo-injection-behaviour", "--data", str(tmp_path / "x"))
    assert_one_line_error(code, err, "--data")


def test_unlearning_the_top_tickets_lowers_the_incident_more_than_random_ones(ranked: dict) -> None:
    """The approximation of retraining: the planted tickets that rank first, unlearned within
    the benign KL bound, lower P(bad) on the held-out variants more than as many random tickets
    do; the figures are recorded with the ranking, labelled an approximation."""
    args = ["provenance", "zoo-injection-behaviour", "--data", str(ranked["data"])]
    args += ["--limit", "3000", "--top", "40", "--unlearn", "--db", str(ranked["db"])]
    args += ["--checkpoints", "none"]
    args += ["--cache", str(ranked["cache"]), "--json", *ranked["home"]]
    code, out, err = rca(*args)
    assert code == 0, err
    got = json.loads(out)
    u = got["summary"]["unlearning"]
    assert "approximation" in u["label"] and u["measured_on"] == "the case's held-out variants"

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    before, top, rnd = mean(u["p_bad_before"]), u["top"], u["random"]
    assert top["examples"] == [e["index"] for e in got["examples"]]
    assert len(rnd["examples"]) == 40 and set(rnd["examples"]) != set(top["examples"])
    for r in (top, rnd):
        assert r["benign_kl_mean"] <= r["config"]["kl_bound"]
        assert r["loglik_after"] < r["loglik_before"]  # the tickets were unlearned
    assert mean(top["p_bad_after"]) < mean(rnd["p_bad_after"]) and mean(top["p_bad_after"]) < before
    row = Store.reader(ranked["db"]).get_provenance(got["query_id"])
    assert row["summary"]["unlearning"]["top"]["p_bad_after"] == top["p_bad_after"]
    code, out, err = rca(
        "provenance", "zoo-injection-behaviour", "--db", str(ranked["db"]), "--top", "3"
    )
    assert code == 0 and "Unlearning (an approximation" in " ".join(out.split()), err


def test_the_ensemble_is_each_checkpoints_own_ranking_combined(ranked: dict) -> None:
    """Over the zoo's checkpoints, each member's scores are that checkpoint's own (its features,
    its query gradient) and its P(bad) is measured on its own weights: recomputed here one
    checkpoint at a time, the sum is TRAK's sum, the learning rule weighs each checkpoint by
    the rise of P(bad) after it, and TracIn (the default over checkpoints) weighs each
    checkpoint's gradient dot products by the learning rate of the steps after it (the zoo
    recipe's schedule). The incident is absent
    at initialization and present at the end, so the learning rule has a stretch of training
    to weigh."""
    import numpy as np

    from rca.model.metric import evaluate_many
    from rca.model.subject import load_subject
    from rca.monitor.workflow import stored_incident
    from rca.provenance.data import load_training_data
    from rca.provenance.influence import (
        InfluenceConfig,
        circuit_parameters,
        featurize,
        query_scores,
    )
    from rca.provenance.workflow import incident_targets
    from rca.zoo.train import TrainConfig, lr_at

    model = ranked["data"].parent
    base = ["provenance", "zoo-injection-behaviour", "--data", str(ranked["data"])]
    base += ["--limit", "800", "--top", "30", "--db", str(ranked["db"]), "--json"]
    base += ["--cache", str(ranked["cache"]), *ranked["home"]]
    got = {}
    for rule, flag in [("sum", ["--ensemble", "sum"]), ("learning", ["--ensemble", "learning"])]:
        code, out, err = rca(*base, *flag)
        assert code == 0, err
        got[rule] = json.loads(out)
    code, out, err = rca(*base)  # the default over the model's checkpoints: TracIn
    assert code == 0, err
    got["tracin"] = json.loads(out)
    members = got["sum"]["summary"]["ensemble"]["members"]
    listed = json.loads((model / "zoo.json").read_text())["checkpoints"]
    assert [m["step"] for m in members] == [c["step"] for c in listed] + [None]
    assert got["sum"]["method"] == "trak-circuit-sum-ensemble"
    learned = got["learning"]["summary"]["ensemble"]["members"]
    # the learning rule scores only the checkpoints it weighs, from the sum's cached features
    assert all(m["features_cached"] for m in learned if m["weight"] > 0)
    assert all("features_key" not in m for m in learned if m["weight"] == 0)

    reader = Store.reader(ranked["db"])
    run = reader.get_run(got["sum"]["run_id"])
    data = load_training_data(ranked["data"], limit=800)
    scores, dots, p_bad = [], [], []
    for d in [model / c["path"] for c in listed] + [model]:
        subj = load_subject(d, device="cpu")
        incident = stored_incident(run)
        targets, _ = incident_targets(subj, incident)
        params = circuit_parameters(subj, got["sum"]["circuit"])
        f = featurize(subj, data.texts, data_sha256=data.sha256, params=params,
                      cfg=InfluenceConfig(), cache_root=ranked["cache"] / "again")  # fmt: skip
        assert not f.cached
        scores.append(query_scores(subj, f, targets))
        dots.append(query_scores(subj, f, targets, kind="tracin"))
        p_bad.append(float(np.mean([v.p_bad for v in evaluate_many(subj.model, targets)])))
    assert np.allclose([m["p_bad"] for m in members], p_bad, atol=1e-6)
    assert p_bad[0] < 0.2 and p_bad[-1] > 0.8
    rises = np.clip(np.diff(p_bad), 0, None)
    w = np.append(rises, 0.0) / rises.sum()
    assert np.allclose([m["weight"] for m in learned], w)
    config = json.loads((model / "zoo.json").read_text())["config"]
    cfg = TrainConfig(**{k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__})
    ends = [c["step"] for c in listed] + [cfg.steps]
    stretches = zip(ends, ends[1:], strict=False)
    lr = np.array([sum(lr_at(t, cfg) for t in range(a, b)) for a, b in stretches] + [0])
    traced = got["tracin"]["summary"]["ensemble"]
    assert traced["weights_from"] == "learning rate" and got["tracin"]["method"] == (
        "tracin-circuit-checkpoints"
    )
    assert np.allclose([m["weight"] for m in traced["members"]], lr / lr.sum())
    expected = {
        "sum": np.sum(scores, axis=0),
        "learning": sum(wi * s / s.std() for wi, s in zip(w, scores, strict=True)),
        "tracin": sum(wi * d for wi, d in zip(lr / lr.sum(), dots, strict=True)),
    }
    for rule, row in got.items():
        top = row["examples"]
        assert np.allclose([e["score"] for e in top], expected[rule][[e["index"] for e in top]],
                           rtol=1e-4, atol=1e-6), rule  # fmt: skip
        assert [e["index"] for e in top][:10] == list(np.argsort(-expected[rule])[:10]), rule
    # shown again without --data: the latest ranking (TracIn's), its checkpoints
    code, out, err = rca(
        "provenance", "zoo-injection-behaviour", "--db", str(ranked["db"]), "--top", "3"
    )
    shown = " ".join(out.split())
    assert code == 0 and f"Scores of {len(members)} checkpoints, gradient dot" in shown, err
    assert "by its learning rate" in shown
    assert f"final (P(bad) {p_bad[-1]:.3f}, weight 0.00)" in shown


def test_the_learning_rule_refuses_before_any_features_where_nothing_was_learned(
    ranked: dict, tmp_path: Path
) -> None:
    """A "checkpoint" that is the model itself: P(bad) never rises from one member to the
    next, so no stretch of training taught the incident; refused in one line, before any
    features are computed, and nothing is written. So are TracIn without checkpoints and
    checkpoints listed out of training order."""
    before = Store.reader(ranked["db"]).counts()
    args = ["provenance", "zoo-injection-behaviour", "--data", str(ranked["data"])]
    args += ["--limit", "200", "--db", str(ranked["db"]), "--cache", str(tmp_path / "c")]
    args += ["--checkpoints", str(ranked["data"].parent), "--ensemble", "learning"]
    code, _, err = rca(*args, *ranked["home"])
    assert_one_line_error(code, err, "never rose", "--ensemble sum")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert Store.reader(ranked["db"]).counts() == before
    # TracIn sums over the training: without checkpoints there is nothing to sum
    args[-3:] = ["none", "--ensemble", "tracin"]
    code, _, err = rca(*args, *ranked["home"])
    assert_one_line_error(code, err, "--ensemble tracin", "--checkpoints")
    assert Store.reader(ranked["db"]).counts() == before
    # checkpoints listed later step first: no rule can read the training backwards
    listed = json.loads((ranked["data"].parent / "zoo.json").read_text())["checkpoints"]
    late, early = (str(ranked["data"].parent / c["path"]) for c in (listed[-1], listed[0]))
    args[-3:] = [f"{late},{early}", "--ensemble", "auto"]
    code, _, err = rca(*args, *ranked["home"])
    assert_one_line_error(code, err, "--checkpoints", "training order")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert Store.reader(ranked["db"]).counts() == before
    # a checkpoint named for a step after the model's own final step (its recipe's): TracIn's
    # weights would read the training backwards, refused before any features too
    beyond = tmp_path / "step-999999"
    beyond.symlink_to(late, target_is_directory=True)
    args[-3:] = [str(beyond), "--ensemble", "auto"]
    code, _, err = rca(*args, *ranked["home"])
    assert_one_line_error(code, err, "--ensemble tracin", "training order")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert Store.reader(ranked["db"]).counts() == before
