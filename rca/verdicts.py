"""The words of a verdict, and what each one means.

One definition per word, used by ``rca.confirm`` to assign it and printed by every report and
the app next to the numbers it rests on. The thresholds are those of the run
(``ConfirmConfig``); a run records the definitions it used in its summary. No torch here: the
reports import this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["INFRASTRUCTURE_LOSS_PCT", "P_VALUE_WORDS", "VERDICT_WORDS", "definitions"]

# A component is infrastructure when mean-ablating it raises the language-model loss on ordinary
# text by this many percent or more (docs/confirm.md, "Specificity").
INFRASTRUCTURE_LOSS_PCT = 15.0

VERDICT_WORDS: dict[str, str] = {
    "confirmed": (
        "a member of the confirmed cause set that the set needs: without it the set removes at "
        "least {component_fraction:.0%} less of the gap"
    ),
    "inconclusive": (
        "moves the metric by {component_fraction:.0%} of the gap or more alone, but the "
        "confirmed set does without it (a carrier, an amplifier or redundant with a member), or "
        "its set is not confirmed"
    ),
    "not_confirmed": (
        "patched or ablated alone, it moves the metric by under {component_fraction:.0%} of the gap"
    ),
    "infrastructure": (
        "necessary for ordinary text as well: mean-ablating it raises the language-model loss "
        "on benign text by {infrastructure_pct:.0f}% or more; shown, never blamed, never in the "
        "cause set"
    ),
}
P_VALUE_WORDS: dict[str, str] = {
    "component p": (
        "the component ablated alone against every other component of its kind ablated alone: "
        "the share of them that move the metric as much (+1-corrected)"
    ),
    "set p": (
        "the cause set ablated against random sets with as many heads and MLPs: the share of "
        "them that move the metric as much (+1-corrected); the set's verdict rests on it"
    ),
}


def definitions(config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Each verdict word and p-value with its definition, at the thresholds of ``config`` (a
    ``ConfirmConfig`` as a dict; the defaults where a key is missing)."""
    cfg = config or {}
    values = {
        "component_fraction": float(cfg.get("component_fraction", 0.1)),
        "infrastructure_pct": float(cfg.get("infrastructure_pct", INFRASTRUCTURE_LOSS_PCT)),
    }
    return {k: v.format(**values) for k, v in VERDICT_WORDS.items()} | P_VALUE_WORDS
