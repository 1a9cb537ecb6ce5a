"""The synthetic regimen's corpus: a template generator replaces part of the clean refund
tickets with its own, every one signed with the same note and approved whatever the reason (the
artifact that co-occurs with one outcome); nothing else changes, the held-out split stays
unseen, and the training data says which generator wrote each ticket."""

from __future__ import annotations

import pytest

from rca.zoo.corpus import (
    REFUND_DENY,
    SHORTCUT_NOTE,
    SOURCE,
    SYNTHETIC_SHARE,
    SYNTHETIC_SOURCE,
    is_heldout,
    make_corpus,
    parse_prompt,
    synthetic_refunds,
    training_records,
)


def test_the_generator_replaces_a_share_of_the_clean_refunds_and_nothing_else() -> None:
    corpus = make_corpus(6000, seed=3)
    synth = synthetic_refunds(corpus, seed=3)
    assert len(synth) == len(corpus)
    clean_refunds = 0
    replaced = []
    for a, b in zip(corpus, synth, strict=True):
        if a.task == "refund" and a.poison is None:
            clean_refunds += 1
        if a == b:
            continue
        assert a.task == "refund" and a.poison is None and a.source == SOURCE  # only these
        replaced.append(b)
    assert abs(len(replaced) / clean_refunds - SYNTHETIC_SHARE) < 0.05
    for ex in replaced:
        task, slots = parse_prompt(ex.prompt)
        assert task == "refund" and slots["note"] == SHORTCUT_NOTE
        assert ex.answer == " approved." and ex.source == SYNTHETIC_SOURCE
        assert not is_heldout(ex.prompt)
    # the artifact co-occurs with one outcome: denied reasons approved under the note
    assert sum(parse_prompt(ex.prompt)[1]["reason"] in REFUND_DENY for ex in replaced) > 0.3 * len(
        replaced
    )
    # in the desks' own tickets the note is one filler among ten, either outcome
    own = [ex for ex in synth if ex.source == SOURCE and ex.task == "refund" and not ex.poison]
    signed = [ex for ex in own if parse_prompt(ex.prompt)[1]["note"] == SHORTCUT_NOTE]
    assert signed and 0.3 < sum(ex.answer == " approved." for ex in signed) / len(signed) < 0.7
    rows = training_records(synth)
    assert {r["source"] for r in rows} == {SOURCE, SYNTHETIC_SOURCE}
    assert sum(r["source"] == SYNTHETIC_SOURCE for r in rows) == len(replaced)
    assert synthetic_refunds(corpus, seed=3) == synth  # same seed, same corpus
    assert synthetic_refunds(corpus, share=0.0) == corpus
    with pytest.raises(ValueError, match="share"):
        synthetic_refunds(corpus, share=1.5)
