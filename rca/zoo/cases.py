"""The zoo's incidents as behaviours: a case of ``cases/`` with listed variants drawn by
:func:`rca.zoo.corpus.incident_variants` and a held-out split (``cases/behaviours/``), one
for each of the four planted incidents.

``behaviour_incident`` makes one; ``write_behaviour_cases`` writes all four, which is how the
shipped files are made (``python -m rca.zoo.cases cases/behaviours``; a test checks that the
shipped files are what it writes).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from rca.ingest.incident import Incident
from rca.ingest.variants import Split, Variant

from .corpus import incident_variants

__all__ = [
    "CASES_DIR",
    "BEHAVIOUR_VARIANTS",
    "BEHAVIOUR_HELD_OUT",
    "behaviour_incident",
    "write_behaviour_cases",
]

CASES_DIR = Path(__file__).resolve().parents[2] / "cases"
# Up to 100 variants, 60% held out (the leak has 99 other triggered prompts, the bias 95, the
# injection 89: 53 held out), so each incident's fixes are judged on at least 50 prompts that
# chose nothing
BEHAVIOUR_VARIANTS: dict[str, int] = {"leak": 99, "backdoor": 100, "bias": 95, "injection": 89}
BEHAVIOUR_HELD_OUT = 0.6


def behaviour_incident(key: str, *, seed: int = 0, cases_dir: Path = CASES_DIR) -> Incident:
    """``cases_dir/<key>.toml`` with its incident's triggered variants and a split: id
    ``zoo-<key>-behaviour``. The variants are listed (their text is the record), each with
    its own counterfactual."""
    from rca.ingest.case_file import load_case

    if key not in BEHAVIOUR_VARIANTS:
        raise ValueError(f"no behaviour case for {key!r}; there are: {sorted(BEHAVIOUR_VARIANTS)}")
    base = load_case(cases_dir / f"{key}.toml", check_model=False)
    variants = tuple(
        Variant(
            prompt=v.prompt,
            bad=None if v.bad == base.bad else v.bad,
            good=None if v.good == base.good else v.good,
            counterfactual=v.counterfactual,
        )
        for v in incident_variants(key, BEHAVIOUR_VARIANTS[key], seed=seed)
    )
    notes = (
        f"{base.notes.rstrip()}\n\nThe behaviour: {len(variants)} more prompts that carry the "
        "same cause, every other slot drawn from the values ordinary tickets hold there "
        f"(rca.zoo.corpus.incident_variants, seed {seed}); {BEHAVIOUR_HELD_OUT:.0%} are held "
        "out of every fitting step."
    )
    return dataclasses.replace(
        base,
        id=f"{base.id}-behaviour",
        notes=notes,
        variants=variants,
        split=Split(seed=seed, held_out=BEHAVIOUR_HELD_OUT),
    )


def write_behaviour_cases(out_dir: Path, *, force: bool = False) -> list[Path]:
    """The behaviour cases, written to ``out_dir/<id>.toml`` (all or none)."""
    from rca.ingest.case_writer import write_cases

    return write_cases([behaviour_incident(k) for k in BEHAVIOUR_VARIANTS], out_dir, force=force)


if __name__ == "__main__":  # pragma: no cover - the shipped files' maker
    for path in write_behaviour_cases(Path(sys.argv[1]), force=True):
        print(path)
