"""The monitor artifact: a directory holding ``probe.safetensors`` (the detector's weights)
and ``monitor.json`` (the model fingerprint, the sites and their position rules, the
threshold, how the prompts were drawn, the figures, and the weights file's sha256).

Loading checks all of it and names the first problem in one line (``MonitorError``); a
monitor is only attached to the model whose fingerprint it holds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from rca.monitor.probe import Probe
from rca.monitor.sites import SiteSpec

__all__ = ["FORMAT", "Monitor", "MonitorError", "load_monitor", "save_monitor"]

FORMAT = "rca-monitor/1"
JSON_NAME = "monitor.json"
MAX_JSON_BYTES = 16 << 20
WEIGHTS_NAME = "probe.safetensors"


class MonitorError(ValueError):
    """A monitor that cannot be built, loaded or attached; one line naming the fix."""


@dataclass
class Monitor:
    """A compiled detector for one confirmed incident on one model."""

    monitor_id: str
    case_id: str
    run_id: str
    model_fingerprint: str
    sites: list[SiteSpec]
    probe: Probe
    threshold: float  # a prompt flags when its score is >= threshold
    target_fpr: float  # the false-positive rate the threshold was set for, on fit negatives
    bad: str  # the incident's bad continuation
    bad_ids: list[int]  # ... as the model's tokenizer encodes it after the prompt
    data: dict[str, Any]  # how the fit and held-out prompts were drawn
    fit: dict[str, Any]  # the figures on the fit prompts
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())

    @property
    def width(self) -> int:
        return int(self.probe.weight.shape[0])

    def describe(self) -> dict[str, Any]:
        """Everything but the weights, as monitor.json holds it."""
        return {
            "format": FORMAT,
            "monitor_id": self.monitor_id,
            "case_id": self.case_id,
            "run_id": self.run_id,
            "model_fingerprint": self.model_fingerprint,
            "sites": [s.to_json() for s in self.sites],
            "width": self.width,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "bad": self.bad,
            "bad_ids": list(self.bad_ids),
            "data": self.data,
            "fit": self.fit,
            "caution": self.caution(),
            "created_at": self.created_at,
        }

    def caution(self) -> str | None:
        """Why the threshold may pass new variants: too few fit positives placed it."""
        from rca.monitor.probe import few_positives_caution

        n = self.fit.get("n_positive")
        return None if n is None else few_positives_caution(int(n))

    def check_model(self, fingerprint: str | None) -> None:
        """Refuse a model other than the one the monitor was built on."""
        if fingerprint is None:
            raise MonitorError(
                f"monitor {self.monitor_id}: the model has no fingerprint (an in-memory model); "
                "load it with rca.load_subject, or pass fingerprint= for the files it came from"
            )
        if fingerprint != self.model_fingerprint:
            raise MonitorError(
                f"monitor {self.monitor_id} was built on model {self.model_fingerprint[:12]}, not "
                f"on this one ({fingerprint[:12]}); build a monitor for this model with "
                "`rca monitor build`"
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_monitor(monitor: Monitor, directory: str | Path) -> Path:
    """Write the artifact into ``directory`` (made if missing; an artifact already there is
    replaced, anything else refused). Both files are written beside it and renamed into
    place, so a crash leaves the previous artifact or none. Returns monitor.json's path."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise MonitorError(f"--out {d} is a file; give a directory for the monitor")
    d.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in d.iterdir() if p.name not in (JSON_NAME, WEIGHTS_NAME))
    if others:
        raise MonitorError(
            f"--out {d} holds other files ({', '.join(others[:3])}); give an empty directory"
        )
    fd, tmp_w = tempfile.mkstemp(dir=d, suffix=".safetensors.tmp")
    os.close(fd)
    fd, tmp_j = tempfile.mkstemp(dir=d, suffix=".json.tmp")
    os.close(fd)
    try:
        save_file(monitor.probe.tensors(), tmp_w, metadata={"format": FORMAT})
        meta = monitor.describe() | {"weights_sha256": _sha256(Path(tmp_w))}
        Path(tmp_j).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_w, d / WEIGHTS_NAME)
        os.replace(tmp_j, d / JSON_NAME)
    finally:
        for t in (tmp_w, tmp_j):
            Path(t).unlink(missing_ok=True)
    return d / JSON_NAME


def _need(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    v = meta.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise MonitorError(
            f"{where}: key {key!r} is missing or not a {getattr(kind, '__name__', kind)}"
        )
    return v


def load_monitor(path: str | Path) -> Monitor:
    """The artifact at ``path`` (its directory or its monitor.json), checked: its format,
    every field, the weights file's sha256, and the weights' width against the sites'."""
    p = Path(path)
    j = p / JSON_NAME if p.is_dir() else p
    if not j.is_file():
        raise MonitorError(
            f"{p}: no {JSON_NAME} there; give the directory `rca monitor build` wrote"
        )
    try:
        meta = json.loads(j.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MonitorError(f"{j}: not JSON ({e}); rebuild the monitor") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MonitorError(f"{j}: not an rca monitor (format is not {FORMAT!r})")
    w = j.parent / WEIGHTS_NAME
    if not w.is_file():
        raise MonitorError(f"{j.parent}: {WEIGHTS_NAME} is missing; rebuild the monitor")
    if _sha256(w) != meta.get("weights_sha256"):
        raise MonitorError(
            f"{w}: its sha256 differs from the one monitor.json records; the weights were "
            "changed after the build, rebuild the monitor"
        )
    try:
        sites = [SiteSpec(**s) for s in _need(meta, "sites", list, j)]
        probe = Probe.from_tensors(load_file(str(w)))
    except (TypeError, ValueError) as e:
        raise MonitorError(f"{j}: {e}") from None
    if not sites:
        raise MonitorError(f"{j}: key 'sites' is empty")
    if probe.weight.shape[0] != _need(meta, "width", int, j):
        raise MonitorError(f"{j}: the weights' width differs from the recorded width")
    return Monitor(
        monitor_id=_need(meta, "monitor_id", str, j),
        case_id=_need(meta, "case_id", str, j),
        run_id=_need(meta, "run_id", str, j),
        model_fingerprint=_need(meta, "model_fingerprint", str, j),
        sites=sites,
        probe=probe,
        threshold=float(_need(meta, "threshold", (int, float), j)),
        target_fpr=float(_need(meta, "target_fpr", (int, float), j)),
        bad=_need(meta, "bad", str, j),
        bad_ids=[int(t) for t in _need(meta, "bad_ids", list, j)],
        data=_need(meta, "data", dict, j),
        fit=_need(meta, "fit", dict, j),
        created_at=_need(meta, "created_at", str, j),
    )
