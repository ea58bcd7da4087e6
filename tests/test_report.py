"""The report a person reads: the candidate table, the choice, the notes and the files beside the checkpoint."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from shortgpt_serve.profile import LayerProfile
from shortgpt_serve.report import (
    BI_PNG,
    QUALITY_PNG,
    REPORT_JSON,
    REPORT_MD,
    build_json,
    build_markdown,
    candidate_rows,
    describe_candidates,
    noise_notes,
    report_files,
    short_summary,
    table_header,
)
from shortgpt_serve.selection import Candidate, Selection
from tests.test_provenance import FULL, SHORTENED

TASKS = ["arc_easy", "piqa"]
PROFILE = LayerProfile(
    bi=[0.9, 0.1, 0.01, 0.2, 0.02, 0.3],
    num_tokens=512,
    num_sequences=16,
    seq_len=32,
    calibration_source="cal.txt",
    calibration_sha256="cd" * 32,
)


def selection(quality: dict[str, Any] | None = SHORTENED, min_quality: float | None = 0.85) -> Selection:
    candidates = [
        Candidate(0, [], 1.0, 1_000_000, False),
        Candidate(1, [2], 0.9, 900_000, False, quality=None),  # not measured: left out of the table
        Candidate(2, [2, 4], 0.8, 800_000, True, quality=quality),
    ]
    return Selection(
        removed=[2, 4],
        budget=0.8,
        cost_ratio=0.8,
        params_full=1_000_000,
        params_short=800_000,
        num_layers=6,
        candidates=candidates,
        reason="2 layers removed: both budgets met.",
        min_quality=min_quality,
        quality=quality,
        latency_met=True,
        quality_met=True if quality else None,
    )


def test_candidate_rows_list_the_full_model_and_the_measured_depths() -> None:
    rows = candidate_rows(selection(), FULL, TASKS)
    assert rows == [
        ["0", "—", "1.0M", "1.000", "0.550", "0.670", "44.70", "0.000", "1.000", "—", "1.000", "1.000"],
        ["2 ✓", "2,4", "0.8M", "0.800", "0.520", "0.650", "67.20", "—", "—", "—", "0.860 ±0.04", "0.950"],
    ]
    assert table_header(TASKS) == [
        "removed",
        "layers",
        "params",
        "cost",
        *TASKS,
        "ppl",
        "KL",
        "top-1",
        "lambada",
        "retained",
        "raw ratio",
    ]


def test_a_healed_candidate_shows_plain_and_healed_rows() -> None:
    plain = {**SHORTENED, "retained": 0.70, "kl": 0.9, "agreement": 0.5, "lambada": 0.1}
    healed = {
        **SHORTENED,
        "kl": 0.6,
        "agreement": 0.6,
        "lambada": 0.2,
        "retained_ci": [0.80, 0.92],
        "plain": plain,
        "heal": {"method": "linear"},
    }
    rows = candidate_rows(selection(healed), FULL, TASKS)
    assert [r[0] for r in rows] == ["0", "2 plain", "2 healed ✓"]
    assert rows[1][7:10] == ["0.900", "0.500", "0.100"] and rows[1][10] == "0.700 ±0.04"
    assert rows[2][7:10] == ["0.600", "0.600", "0.200"] and rows[2][10] == "0.860 [0.80, 0.92]"
    notes = noise_notes(selection(healed), FULL)
    assert any("interval 0.800-0.920), which contains the floor 0.85: the choice is within noise" in n for n in notes)
    assert any("Healing (linear) at the chosen depth: retained 0.700 -> 0.860" in n for n in notes)
    assert not any("paired interval" in n for n in notes)  # no gain interval measured: none claimed
    for gain, verdict in (([-0.02, 0.30], "within noise"), ([0.05, 0.27], "beyond noise")):
        notes = noise_notes(selection({**healed, "gain_ci": gain}), FULL)
        want = f"Healed minus plain retained: 95% paired interval [{gain[0]:+.3f}, {gain[1]:+.3f}] ({verdict}"
        assert any(want in n for n in notes), notes


def test_short_summary_prints_the_table_right_aligned() -> None:
    text = short_summary(selection(), FULL, TASKS)
    lines = text.splitlines()
    assert lines[0].split() == [*table_header(TASKS)[:-1], "raw", "ratio"]
    assert lines[0].endswith("raw ratio") and lines[1].startswith("-------")
    assert lines[3].startswith("    2 ✓")  # right-aligned under "removed"
    assert "Kept 4 of 6 layers, 800,000 of 1,000,000 parameters (80.0%); predicted cost 0.800." in text
    assert short_summary(selection(None, None), None, []).splitlines()[0] == "2 layers removed: both budgets met."


def test_noise_notes_flag_a_choice_within_two_standard_errors() -> None:
    close = {**SHORTENED, "retained": 0.87, "retained_se": 0.02}
    [note] = noise_notes(selection(close), FULL)
    assert "retains 0.870 ± 0.020, within two standard errors of the floor 0.85" in note
    far = {**SHORTENED, "retained": 0.95, "retained_se": 0.02}
    assert noise_notes(selection(far), FULL) == []  # 0.10 above the floor, five standard errors
    assert noise_notes(selection(), {**FULL, "no_signal": ["piqa"]})[0].startswith("No signal on piqa")


def test_describe_candidates_without_a_selection() -> None:
    text = describe_candidates(selection().candidates, FULL, TASKS)
    lines = text.splitlines()
    # No depth is chosen yet, so the mark sits on the full model; the unmeasured depth is left out.
    assert [line.split()[:2] for line in lines[2:]] == [["0", "✓"], ["2", "2,4"]]


def report(quality: dict[str, Any] | None = SHORTENED) -> dict[str, Any]:
    sel = selection(quality, 0.85 if quality else None)
    return build_json(
        source={"name": "tiny"},
        profile=PROFILE,
        selection=sel,
        full=FULL if quality else None,
        settings={"quality": {"limit": 100, "seed": 1234, "dtype": "auto", "perplexity_tokens": 4096}},
        timings={"profile": 1.2},
    )


def test_markdown_has_the_budgets_and_the_candidates() -> None:
    text = build_markdown(report(), TASKS, selection())
    assert text.startswith("# Shortening report: tiny, 4 of 6 layers\n")
    assert "| budget | asked | got | met |\n|---|---|---|---|\n" in text
    assert "| latency (predicted cost vs full) | ≤ 0.80 | 0.800 | yes |" in text
    assert "| quality retained | ≥ 0.85 | 0.860 | yes |" in text
    assert "| 2 ✓ | 2,4 | 0.8M | 0.800 | 0.520 | 0.650 | 67.20 | — | — | — | 0.860 ±0.04 | 0.950 |" in text
    assert "Primary metrics: arc_easy: acc, piqa: acc_norm." in text
    assert "- Time: profile 1.2 s." in text
    unmeasured = build_markdown(report(None), [], selection(None, None))
    assert "quality retained |" not in unmeasured and "Quality was not measured" in unmeasured


def test_report_files() -> None:
    files = report_files(report(), TASKS, PROFILE, selection())
    assert set(files) == {REPORT_JSON, REPORT_MD, BI_PNG, QUALITY_PNG}
    assert json.loads(files[REPORT_JSON])["choice"]["removed_layers"] == [2, 4]
    assert files[BI_PNG].startswith(b"\x89PNG") and files[QUALITY_PNG].startswith(b"\x89PNG")
    assert QUALITY_PNG not in report_files(report(None), [], PROFILE, selection(None, None))


def test_a_non_monotone_search_is_called_noise() -> None:
    sel = selection({**SHORTENED, "retained": 0.86})
    deeper = dataclasses.replace(sel.candidates[1], quality={**SHORTENED, "retained": 0.70})
    sel = dataclasses.replace(sel, candidates=[sel.candidates[0], deeper, sel.candidates[2]])
    notes = noise_notes(sel, FULL)
    assert any("not monotone in depth here (2 removed retains 0.860, more than 0.700 at 1)" in n for n in notes)
    assert not any("monotone" in n for n in noise_notes(selection(), FULL))


def test_the_retained_cell_shows_the_monotone_fit_where_it_differs() -> None:
    pooled = {**SHORTENED, "retained_ci": [0.80, 0.92], "retained_fit": 0.78}
    rows = candidate_rows(selection(pooled), FULL, TASKS)
    assert rows[1][10] == "0.860 [0.80, 0.92] (fit 0.780)"
    same = {**SHORTENED, "retained_fit": SHORTENED["retained"]}
    assert candidate_rows(selection(same), FULL, TASKS)[1][10] == "0.860 ±0.04"
