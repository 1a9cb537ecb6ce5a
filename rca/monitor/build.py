"""Compile a confirmed run into a monitor, and judge it on held-out prompts.

The prompts (``monitor_prompts``):

- **positives**: the case's prompt and its variants on which the model really produces the
  bad continuation (P(bad) >= 0.5); the fit variants fit the detector, the held-out ones judge
  it;
- **hard negatives**: the counterfactual of each of those prompts (the cause replaced);
- **benign negatives**: ordinary prompts, as the model sees them just before it answers (the
  zoo's held-out support-desk prompts for a zoo model; rca's benign corpus otherwise, a
  chat incident's rendered as conversations with the generation prompt), drawn by a seed and
  split in half: one half fits, the other judges.

``build_monitor`` fits the probe on the fit prompts and sets the threshold for a stated
false-positive rate on the fit negatives. ``evaluate_monitor`` scores the held-out prompts,
and the same split with two baselines: the output check (generate, and flag when the bad
continuation appears) and a prompt-text classifier (the same regression on token counts).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rca.ingest.incident import Incident, IncidentError
from rca.ingest.preflight import SHOWS
from rca.model.metric import Target, as_probability, encode_text, evaluate_many
from rca.model.subject import Subject
from rca.monitor.artifact import Monitor, MonitorError
from rca.monitor.probe import TokenCounts, figures, fit_probe, threshold_for_fpr
from rca.monitor.sites import SiteSpec, sequence_features

__all__ = [
    "MonitorConfig",
    "decision_position",
    "monitor_basis",
    "rebuild_config",
    "MonitorPrompts",
    "build_monitor",
    "evaluate_monitor",
    "monitor_prompts",
    "monitor_sites",
    "greedy_continuations",
    "output_check",
]


@dataclass(frozen=True)
class MonitorConfig:
    target_fpr: float = 0.01  # the threshold's false-positive rate on the fit negatives
    benign: int = 1000  # benign prompts per half (fit, held-out); fewer where fewer exist
    benign_tokens: int = 24  # each benign prompt is read through this many generated tokens
    seed: int = 0  # draws and splits the benign prompts
    l2: float = 1e-2
    batch: int = 32

    def check(self) -> None:
        if not 0.0 <= self.target_fpr < 1.0:
            raise MonitorError(f"--fpr must be in [0, 1), got {self.target_fpr}")
        if not 1 <= self.benign <= 100_000:
            raise MonitorError(f"--benign must be between 1 and 100000, got {self.benign}")
        if not 0 <= self.benign_tokens <= 1024:
            raise MonitorError(
                f"--benign-tokens must be between 0 and 1024, got {self.benign_tokens}"
            )
        if not 1 <= self.batch <= 4096:
            raise MonitorError(f"--batch must be between 1 and 4096, got {self.batch}")
        if self.l2 <= 0:
            raise MonitorError(f"l2 must be positive, got {self.l2}")


@dataclass
class Reads:
    """Texts the detector scores. Each is a token sequence read at every position from
    ``starts[i]`` to its end (a text's score is its highest), with the prompt it begins with
    (what the prompt-text classifier and the output check see) and the bad continuation it
    belongs to (what the output check looks for)."""

    ids: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # the prompts' texts
    bad: list[str] = field(default_factory=list)

    def add(self, prompt: list[int], tail: list[int], text: str, bad: str, *, whole: bool) -> None:
        """``prompt`` followed by ``tail``: read at its last position only, or (``whole``)
        from the prompt's last position on."""
        ids = list(prompt) + list(tail)
        self.ids.append(ids)
        self.starts.append(len(prompt) - 1 if whole else len(ids) - 1)
        self.prompts.append(list(prompt))
        self.texts.append(text)
        self.bad.append(bad)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Part:
    """One half of the prompts."""

    positives: Reads = field(default_factory=Reads)
    counterfactuals: Reads = field(default_factory=Reads)
    benign: Reads = field(default_factory=Reads)
    positive_index: list[int | None] = field(default_factory=list)  # variant index; None: case

    def kinds(self) -> dict[str, Reads]:
        return {
            "positives": self.positives,
            "counterfactuals": self.counterfactuals,
            "benign": self.benign,
        }


@dataclass
class MonitorPrompts:
    fit: Part
    held_out: Part
    shown: dict[str, int]  # per part: prompts that show the incident
    dropped: dict[str, int]  # per part: prompts left out, the model not showing the incident
    source: str  # where the benign prompts came from
    benign_tokens: int = 0  # the greedy tokens each benign read holds after its prompt

    def describe(self) -> dict[str, Any]:
        def counts(p: Part) -> dict[str, int]:
            b = p.benign
            read = sum(len(i) - s for i, s in zip(b.ids, b.starts, strict=True))
            return {k: len(r) for k, r in p.kinds().items()} | {"benign_positions": read}

        return {
            "fit": counts(self.fit),
            "held_out": counts(self.held_out),
            "dropped_not_shown": self.dropped,
            "benign_source": self.source,
        }


# ---------------------------------------------------------------------------- sites


def decision_position(target: Target) -> int:
    """Where the incident is decided: the position that predicts the first token the metric
    reads (the prompt's last position; with a ``focus``, the position before the focus's
    first token, the bad continuation's earlier tokens in between)."""
    return target.n_prompt - 1 + (target.focus[0] if target.focus else 0)


def _teacher_forced(target: Target) -> list[int]:
    """The bad continuation's tokens before the focus (none without one)."""
    return list(target.bad_ids[: target.focus[0]]) if target.focus else []


def monitor_basis(run: dict[str, Any]) -> str:
    """Why the run's mechanism can be monitored: its verdict is confirmed, or its circuit is
    faithful (its specific members, patched alone, remove the stated share of the gap).
    MonitorError when neither: there is no established mechanism to watch."""
    summary = run.get("summary") or {}
    if summary.get("verdict") == "confirmed":
        return "confirmed"
    circuit = summary.get("circuit") or {}
    need = ((run.get("config") or {}).get("confirm") or {}).get("faithful_fraction", 0.8)
    faith = circuit.get("faithfulness")
    specific = [m for m in circuit.get("members") or [] if m.get("role") != "infrastructure"]
    if specific and isinstance(faith, int | float) and faith >= need:
        return "faithful circuit"
    raise MonitorError(
        f"run {run['run_id']}: its verdict is {summary.get('verdict')!r} and it has no faithful "
        "circuit: there is no established mechanism to monitor; investigate the case until "
        "one is confirmed"
    )


def monitor_sites(summary: dict[str, Any], decision: int) -> list[SiteSpec]:
    """The sites the verdict names: its circuit's specific members (entry, route, writer),
    each read at the current position where it acts at the decision position or after it (a
    writer with no resolved position too), else at its running maximum over positions (an
    entry acts where the incident's input arrives, which moves from prompt to prompt).
    Without a circuit: the cause set (the behaviour's, where it was chosen on the fit set and
    holds there), read at its running maximum."""
    circuit = summary.get("circuit") or {}
    sites: list[SiteSpec] = []
    for m in circuit.get("members") or []:
        if m.get("role") == "infrastructure":
            continue
        pos = list(m.get("positions") or [])
        at_end = bool(pos) and min(pos) >= decision
        rule = "last" if at_end or (m.get("role") == "writer" and not pos) else "max"
        sites.append(SiteSpec(m["id"], m.get("role") or "member", rule))
    if sites:
        return sites
    behaviour = summary.get("behaviour") or {}
    cs = behaviour.get("cause_set") or {}
    comps = cs.get("components") if cs.get("holds_on_fit_set") else None
    comps = comps or summary.get("cause_set") or []
    if not comps:
        raise MonitorError("the run names no cause set; there is nothing to monitor")
    return [SiteSpec(c, "cause", "max") for c in comps]


# ---------------------------------------------------------------------------- prompts


@torch.inference_mode()
def greedy_continuations(
    subject: Subject, token_ids: Sequence[Sequence[int]], *, n_new: int, batch: int
) -> list[list[int]]:
    """What the model generates greedily after each prompt: up to ``n_new`` tokens, cut after
    its end-of-sequence token. Batched by length, left-padded."""
    if n_new == 0:
        return [[] for _ in token_ids]
    tok = subject.tokenizer
    eos = getattr(getattr(subject.model, "generation_config", None), "eos_token_id", None)
    eos = getattr(tok, "eos_token_id", None) if eos is None else eos
    stops = set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
    pad = getattr(tok, "pad_token_id", None)
    pad = (next(iter(stops)) if stops else 0) if pad is None else pad
    out: list[list[int]] = [[] for _ in token_ids]
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    for b0 in range(0, len(order), batch):
        idx = order[b0 : b0 + batch]
        width = max(len(token_ids[i]) for i in idx)
        ids = torch.tensor(
            [[pad] * (width - len(token_ids[i])) + list(token_ids[i]) for i in idx],
            device=subject.device,
        )
        mask = torch.tensor(
            [[0] * (width - len(token_ids[i])) + [1] * len(token_ids[i]) for i in idx],
            device=subject.device,
        )
        gen = subject.model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            do_sample=False,
            pad_token_id=pad,
        )
        for i, row in zip(idx, gen[:, width:].tolist(), strict=True):
            cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            out[i] = row[:cut]
    return out


def _benign(incident: Incident, subject: Subject, n: int, seed: int) -> tuple[list[str], str]:
    """Up to ``n`` distinct benign prompts, as the model sees them before it answers."""
    model = incident.model
    if model.startswith("zoo:"):
        from rca import zoo

        if model[4:] in zoo.DEMO_MODELS:
            from rca.zoo.corpus import benign_examples

            seen: dict[str, None] = {}
            for ex in benign_examples(3 * n, seed=seed):
                seen.setdefault(ex.prompt, None)
            return list(seen)[:n], "the zoo's held-out support-desk prompts"
    from rca.benign import CORPUS_VERSION, benign_items

    items = benign_items()
    random.Random(seed).shuffle(items)
    tok = subject.tokenizer
    out: dict[str, None] = {}
    chat = bool(incident.is_chat and getattr(tok, "chat_template", None))
    for item in items:
        if chat:
            turns = item.conversation()
            while turns and turns[-1]["role"] == "assistant":
                turns = turns[:-1]
            if not any(t["role"] == "user" for t in turns):
                continue
            try:
                text = str(
                    tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
                )
            except Exception:  # a template that refuses a system turn: skip the item
                continue
        else:
            text = item.plain()
        out.setdefault(text, None)
        if len(out) == n:
            break
    what = f"rca's benign corpus ({CORPUS_VERSION}{', as chats' if chat else ''})"
    return list(out), what


def monitor_prompts(incident: Incident, subject: Subject, cfg: MonitorConfig) -> MonitorPrompts:
    """The fit and held-out prompts of ``incident`` on ``subject`` (see the module's doc).

    A positive is read at its decision position (``decision_position``); its counterfactual
    from the counterfactual prompt's end to the same point (the bad continuation's tokens
    before the focus teacher-forced after it); a benign prompt from its end through what the
    model generates after it (greedy, ``benign_tokens`` tokens): every position the guard
    would score. MonitorError when no fit or no held-out prompt shows the incident."""
    behaviour = incident.behaviour()
    tok = subject.tokenizer
    members, targets = [], []
    for m in behaviour.members:
        try:
            inc = m.incident.for_model(tok)
            targets.append(inc.encode(subject))
        except IncidentError as e:
            raise m.error(e) from None
        members.append((m, inc))
    values = evaluate_many(subject.model, targets)
    fit, held = Part(), Part()
    shown = {"fit": 0, "held_out": 0}
    dropped = {"fit": 0, "held_out": 0}
    for (m, inc), t, v in zip(members, targets, values, strict=True):
        part = fit if m.part == "fit" else held
        if as_probability(v.metric, t.n_conts) < SHOWS:
            dropped[m.part] += 1
            continue
        shown[m.part] += 1
        tail = _teacher_forced(t)
        part.positives.add(list(t.prompt_ids), tail, str(inc.prompt), inc.bad, whole=False)
        part.positive_index.append(m.index)
        if inc.counterfactual is not None:
            cf = encode_text(tok, inc.counterfactual)
            part.counterfactuals.add(cf, tail, inc.counterfactual, inc.bad, whole=True)
    if not fit.positives:
        raise MonitorError(
            f"no fit prompt of case {incident.id!r} shows the incident on this model "
            "(it prefers the bad continuation); there is nothing to fit a monitor on"
        )
    if not held.positives:
        raise MonitorError(
            f"case {incident.id!r} has no held-out variant that shows the incident (that the "
            "model prefers the bad continuation on); give the case variants and a split "
            "(docs/case-files.md) so that the monitor can be judged"
        )
    texts, source = _benign(incident, subject, 2 * cfg.benign, cfg.seed)
    taken = set(fit.positives.texts) | set(held.positives.texts)
    n_ctx = getattr(subject.adapter, "n_ctx", None)
    encoded = [(p, encode_text(tok, p)) for p in texts if p not in taken]
    if n_ctx is not None:
        encoded = [(p, ids) for p, ids in encoded if len(ids) + cfg.benign_tokens <= n_ctx]
    tails = greedy_continuations(
        subject, [ids for _, ids in encoded], n_new=cfg.benign_tokens, batch=cfg.batch
    )
    half = (len(encoded) + 1) // 2
    for lo, hi, part in ((0, half, fit), (half, len(encoded), held)):
        for (p, ids), tail in zip(encoded[lo:hi], tails[lo:hi], strict=True):
            part.benign.add(ids, tail, p, incident.bad, whole=True)
    if not held.benign:
        raise MonitorError("too few benign prompts to judge the monitor; raise --benign")
    return MonitorPrompts(fit, held, shown, dropped, source, cfg.benign_tokens)


def _features(
    subject: Subject, sites: Sequence[SiteSpec], part: Part, batch: int
) -> dict[str, list[torch.Tensor]]:
    """Per kind, each read's features at every position it is read at."""
    return {
        k: sequence_features(subject, sites, r.ids, r.starts, batch=batch) if len(r) else []
        for k, r in part.kinds().items()
    }


def _scores(monitor: Monitor, feats: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """Per kind, each read's score: its highest over the positions it is read at."""
    return {k: [float(monitor.probe.scores(f).max()) for f in fs] for k, fs in feats.items()}


def _split_figures(s: dict[str, list[float]], threshold: float) -> dict[str, Any]:
    out = figures(s["positives"], s["counterfactuals"] + s["benign"], threshold)
    out["against_counterfactuals"] = figures(s["positives"], s["counterfactuals"], threshold)
    out["against_benign"] = figures(s["positives"], s["benign"], threshold)
    return out


# ---------------------------------------------------------------------------- build


def build_monitor(
    run: dict[str, Any],
    incident: Incident,
    subject: Subject,
    cfg: MonitorConfig | None = None,
) -> tuple[Monitor, MonitorPrompts]:
    """The monitor of a recorded run (``Store.get_run``) on the model it investigated.

    The probe is fit on one row per fit positive (its decision position) against every
    position a fit negative is read at; each class weighs half, and within the negatives
    each text weighs the same however many positions it has. The threshold keeps the share
    of fit negative texts that it flags under ``target_fpr``."""
    cfg = cfg or MonitorConfig()
    cfg.check()
    if subject.fingerprint != run["model_fingerprint"]:
        raise MonitorError(
            f"run {run['run_id']} investigated model {run['model_fingerprint'][:12]}, not this "
            f"one ({(subject.fingerprint or 'in memory')[:12]}); build the monitor on the run's "
            "model, or investigate this model first"
        )
    basis = monitor_basis(run)
    target = incident.for_model(subject.tokenizer).encode(subject)
    sites = monitor_sites(run.get("summary") or {}, decision_position(target))
    prompts = monitor_prompts(incident, subject, cfg)
    feats = _features(subject, sites, prompts.fit, cfg.batch)
    pos = [f[-1:] for f in feats["positives"]]
    neg = feats["counterfactuals"] + feats["benign"]
    x = torch.cat(pos + neg)
    y = [1] * len(pos) + [0] * sum(len(f) for f in neg)
    w = [0.5 / len(pos)] * len(pos)
    for f in neg:
        w += [0.5 / (len(neg) * len(f))] * len(f)
    probe = fit_probe(x, y, l2=cfg.l2, weights=w)
    monitor = Monitor(
        monitor_id=str(uuid.uuid4()),
        case_id=incident.id,
        run_id=run["run_id"],
        model_fingerprint=str(subject.fingerprint),
        sites=list(sites),
        probe=probe,
        threshold=0.0,
        target_fpr=cfg.target_fpr,
        bad=incident.bad,
        bad_ids=list(target.bad_ids),
        data={},
        fit={},
    )
    s = _scores(monitor, feats)
    monitor.threshold = threshold_for_fpr(
        s["counterfactuals"] + s["benign"], cfg.target_fpr, s["positives"]
    )
    monitor.fit = _split_figures(s, monitor.threshold)
    monitor.data = prompts.describe() | {
        "basis": basis,
        "seed": cfg.seed,
        "benign_per_half": cfg.benign,
        "benign_tokens": cfg.benign_tokens,
        "split": None if incident.split is None else incident.split.to_dict(),
        "incident_sha256": incident.sha256,
        "shows_at": SHOWS,
        "l2": cfg.l2,
        "focus": incident.focus,
    }
    return monitor, prompts


# ---------------------------------------------------------------------------- judge


def output_check(
    subject: Subject,
    token_ids: Sequence[Sequence[int]],
    bad: Sequence[str],
    *,
    n_new: int,
    batch: int,
) -> list[float]:
    """The output-check baseline: greedy-generate ``n_new`` tokens after each prompt and flag
    (1.0) where that prompt's bad continuation (``bad[i]``) appears in what was generated."""
    return _shown(subject, greedy_continuations(subject, token_ids, n_new=n_new, batch=batch), bad)


def holds_text(text: str, want: str) -> bool:
    """Whether generated ``text`` holds ``want``, whitespace aside: a word-level tokenizer
    decodes the digits of "4719" as "4 7 1 9"."""
    want = "".join(want.split())
    return bool(want) and want in "".join(text.split())


def _shown(subject: Subject, rows: Sequence[Sequence[int]], bad: Sequence[str]) -> list[float]:
    """1.0 where a generated row's text holds its bad continuation's text, else 0.0."""
    tok = subject.tokenizer
    out = []
    for row, b in zip(rows, bad, strict=True):
        text = tok.decode(list(row), skip_special_tokens=True)
        out.append(1.0 if holds_text(text, b) else 0.0)
    return out


def evaluate_monitor(
    monitor: Monitor,
    incident: Incident,
    subject: Subject,
    *,
    prompts: MonitorPrompts | None = None,
    baselines: bool = True,
    batch: int = 32,
) -> dict[str, Any]:
    """The monitor's figures on the held-out prompts (and, with ``baselines``, the output
    check's and the prompt-text classifier's on the same split). The model must be the one
    the monitor was built on."""
    monitor.check_model(subject.fingerprint)
    if prompts is None:
        prompts = monitor_prompts(incident, subject, rebuild_config(monitor, batch))
    held = prompts.held_out
    s = _scores(monitor, _features(subject, monitor.sites, held, batch))
    result: dict[str, Any] = {
        "monitor": _split_figures(s, monitor.threshold),
        "counts": prompts.describe(),
    }
    if not baselines:
        return result
    # the prompt-text classifier: the same regression on the prompts' token counts, fit on
    # the fit half, its threshold set the same way
    fit = prompts.fit
    kinds = ("positives", "counterfactuals", "benign")
    fit_ids = [p for k in kinds for p in fit.kinds()[k].prompts]
    n_pos = len(fit.positives)
    counts = TokenCounts(fit_ids)
    y = [1] * n_pos + [0] * (len(fit_ids) - n_pos)
    text_probe = fit_probe(counts(fit_ids), y, l2=float(monitor.data.get("l2", 1e-2)))
    fit_scores = text_probe.scores(counts(fit_ids)).tolist()
    text_thr = threshold_for_fpr(fit_scores[n_pos:], monitor.target_fpr, fit_scores[:n_pos])
    ts = {
        k: text_probe.scores(counts(r.prompts)).tolist() if len(r) else []
        for k, r in held.kinds().items()
    }
    # the output check: generate a little more than the longest bad continuation
    tok = subject.tokenizer
    longest = max([len(encode_text(tok, b)) for b in held.positives.bad] + [len(monitor.bad_ids)])
    n_new = longest + 1  # a leading space or a different first token may shift it
    oc = {
        k: output_check(subject, r.prompts, r.bad, n_new=n_new, batch=batch) if len(r) else []
        for k, r in held.kinds().items()
        if k != "benign" or n_new > prompts.benign_tokens
    }
    if "benign" not in oc:  # its greedy continuations were generated with the prompts
        b = held.benign
        tails = [ids[len(p) :][:n_new] for ids, p in zip(b.ids, b.prompts, strict=True)]
        oc["benign"] = _shown(subject, tails, b.bad)
    result["baselines"] = {
        "output_check": _split_figures(oc, 0.5) | {"generated_tokens": n_new},
        "prompt_text": _split_figures(ts, text_thr),
    }
    return result


def rebuild_config(monitor: Monitor, batch: int = 32) -> MonitorConfig:
    """The configuration that draws the same prompts the monitor was built with."""
    return MonitorConfig(
        target_fpr=monitor.target_fpr,
        benign=int(monitor.data.get("benign_per_half", 1000)),
        benign_tokens=int(monitor.data.get("benign_tokens", 24)),
        seed=int(monitor.data.get("seed", 0)),
        l2=float(monitor.data.get("l2", 1e-2)),
        batch=batch,
    )


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
