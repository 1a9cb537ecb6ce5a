"""What the command line prints from a case, a run or a training set is text, never rich
markup: a case id, a remedy note or a table cell holding "[/]" or "[bold]" is printed as typed
(a "[/]" read as markup would be a MarkupError after the work is done), and the command line's
own styling still applies."""

from __future__ import annotations

from typing import Any

from rca.cli import shell

TRICKY = "case [/] [bold]x[/bold] [link=https://e.example]y[/link]"


def _run(**over: Any) -> dict[str, Any]:
    return {
        "case_id": TRICKY,
        "run_id": "r1",
        "verdict": "confirmed",
        "cause_set": ["L1.H2"],
        "causes": [
            {
                "id": f"L1.H2 {TRICKY}",
                "total_effect": 1.0,
                "direct_effect": 0.5,
                "necessity": 0.9,
                "p_value": 0.01,
                "benign_loss_pct": 1.0,
                "verdict": "specific [/]",
            }
        ],
        "remedies": [{"recommended": True, "note": f"ablate [red]{TRICKY}[/red]"}],
        "circuit": None,
    } | over


def test_case_strings_print_as_typed_and_the_cli_s_own_style_still_applies() -> None:
    with shell.out.capture() as cap:
        shell.print_run_summary(_run())
    text = cap.get()
    assert text.count(TRICKY) >= 2
    table = text.split("┏", 1)[1].split("\n* ", 1)[0]  # its cells fold at the console's width
    assert "[/]" in table and "specific" in table
    assert f"ablate [red]{TRICKY}[/red]" in text
    assert "[green]" not in text  # the recommended fix's marker is styling, not text
    with shell.err.capture() as cap:
        shell.err.print("[yellow]warning:[/yellow] x", markup=True)
    assert cap.get().strip() == "warning: x"
