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
