"""results.jsonl journal (resume, refusal to mix, corrupt tails), summaries and the CE/mCE metrics."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from bnadapt.metrics import (
    ALEXNET_ERRORS,
    Accuracy,
    accuracy,
    load_baseline,
    mce,
    paired_bootstrap,
    seed_spread,
    top5_accuracy,
)
from bnadapt.results import RESULTS, Journal, read_results, summarize


def _row(method="source", n=0, seed=None, c="fog", s=1, acc=0.5, model="m", top5=None):
    row = {"model": model, "method": method, "n": n, "seed": seed, "corruption": c, "severity": s,
           "correct": int(acc * 100), "total": 100, "accuracy": acc, "seconds": 0.1, "adapt_on": None}  # fmt: skip
    return row if top5 is None else {**row, "correct5": int(top5 * 100), "top5": top5}


HEADER = {"command": ["bnadapt", "bench"], "fingerprint": {"data": "a"}}


def test_journal_resume_and_refusals(tmp_path):
    j = Journal(tmp_path / "o", HEADER)
    j.append([_row(), _row(s=2)])
    with pytest.raises(ValueError, match="--resume"):
        Journal(tmp_path / "o", HEADER)
    with pytest.raises(ValueError, match="another one .*--force"):
        Journal(tmp_path / "o", {**HEADER, "fingerprint": {"data": "b"}}, resume=True)
    again = Journal(tmp_path / "o", HEADER, resume=True)
    assert again.done == {("m", "source", 0, None, "fog", 1), ("m", "source", 0, None, "fog", 2)}
    Journal(tmp_path / "o", {**HEADER, "fingerprint": {"data": "b"}}, force=True)
    headers, rows = read_results(tmp_path / "o")
    assert len(headers) == 3 and len(rows) == 2


def test_corrupt_tail_ignored_with_warning_and_cut_on_resume(tmp_path, caplog):
    j = Journal(tmp_path, HEADER)
    j.append([_row(), _row(s=2)])
    text = (tmp_path / RESULTS).read_text()
    (tmp_path / RESULTS).write_text(text[:-20])  # a kill -9 mid-write
    with caplog.at_level(logging.WARNING):
        _, rows = read_results(tmp_path)
    assert len(rows) == 1 and "corrupt last line" in caplog.text
    j = Journal(tmp_path, HEADER, resume=True)
    assert len(j.done) == 1
    j.append([_row(s=2)])
    caplog.clear()
    _, rows = read_results(tmp_path)
    assert [r["severity"] for r in rows] == [1, 2] and not caplog.text


def test_last_line_without_newline_is_kept(tmp_path):
    j = Journal(tmp_path, HEADER)
    j.append([_row()])
    (tmp_path / RESULTS).write_text((tmp_path / RESULTS).read_text().rstrip("\n"))
    Journal(tmp_path, HEADER, resume=True).append([_row(s=3)])
    assert [r["severity"] for r in read_results(tmp_path)[1]] == [1, 3]


def test_summary_numbers_by_hand():
    rows = [_row("source", c="gaussian_noise", s=1, acc=0.8), _row("source", c="gaussian_noise", s=5, acc=0.4),
            _row("source", c="spatter", s=1, acc=0.3), _row("source", c="clean", s=0, acc=0.9)]  # fmt: skip
    for seed, shift in ((0, 0.0), (1, 0.1)):
        rows += [_row("replace", 8, seed, "gaussian_noise", 1, 0.7 + shift), _row("replace", 8, seed, "gaussian_noise",
                 5, 0.5 + shift), _row("replace", 8, seed, "spatter", 1, 0.2 + shift)]  # fmt: skip
    src, rep = summarize(rows)
    assert src["mean_acc"] == pytest.approx(0.6) and src["mean_acc_extra"] == pytest.approx(0.3)
    assert src["clean_acc"] == 0.9 and src["mean_acc_std"] == 0.0 and src["seeds"] == [None]
    assert src["per_corruption"] == pytest.approx({"gaussian_noise": 0.6, "spatter": 0.3})
    assert rep["seeds"] == [0, 1] and rep["n"] == 8
    assert rep["mean_acc"] == pytest.approx(0.65) and rep["mean_acc_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert rep["per_severity"] == pytest.approx({"1": 0.75, "5": 0.55}) and rep["clean_acc"] is None
    assert src["mce"] is None and set(src) >= {
        "method",
        "n",
        "seeds",
        "mean_acc",
        "mean_acc_std",
        "mean_acc_extra",
        "per_severity",
        "per_corruption",
        "clean_acc",
        "mce",
        "relative_mce",
    }


def test_mce_alexnet_and_relative():
    errors = {c: {s: e for s in range(1, 6)} for c, e in ALEXNET_ERRORS.items()}
    m, rm = mce(errors, clean_error=0.4348)
    assert m == pytest.approx(1.0) and rm == pytest.approx(1.0)
    half = {c: {s: e / 2 for s in range(1, 6)} for c, e in ALEXNET_ERRORS.items()}
    assert mce(half)[0] == pytest.approx(0.5)
    assert mce({**half, "fog": {1: 0.1}}) == (None, None)  # a mean baseline needs all 5 severities
    rows = [_row(c=c, s=s, acc=1 - e) for c, e in ALEXNET_ERRORS.items() for s in range(1, 6)]
    assert summarize(rows, imagenet=True)[0]["mce"] == pytest.approx(1.0)


def test_baseline_file(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"errors": {"fog": [0.1, 0.2, 0.3, 0.4, 0.5]}, "clean_error": 0.05}))
    b = load_baseline(tmp_path / "b.json")
    rows = [_row(c="fog", s=1, acc=0.95), _row(c="fog", s=5, acc=0.75), _row(c="clean", s=0, acc=0.95)]
    s = summarize(rows, b)[0]
    assert s["mce"] == pytest.approx(0.3 / 0.6) and s["relative_mce"] == pytest.approx((0.3 - 0.1) / (0.6 - 0.1))
    (tmp_path / "bad.json").write_text('{"errors": {"fog": "x"}}')
    with pytest.raises(ValueError, match="expected"):
        load_baseline(tmp_path / "bad.json")


def test_accuracy_functional_and_stateful_agree():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    target = torch.arange(50) % 7
    m = Accuracy()
    for a in range(0, 50, 16):
        m.update(logits[a : a + 16], target[a : a + 16])
    assert m.compute() == accuracy(logits, target) and m.total == 50
    assert m.compute_top5() == top5_accuracy(logits, target) and m.correct5 >= m.correct
    with pytest.raises(ValueError, match="expected logits"):
        accuracy(logits, target[:3])


def test_top5_by_hand_and_with_fewer_than_five_classes():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [9.0, 8, 7, 6, 5, 4, 3], [9.0, 8, 7, 6, 5, 4, 3]])
    assert top5_accuracy(logits, torch.tensor([0, 4, 5])) == pytest.approx(2 / 3)  # ranks 1 and 5 in, rank 6 out
    assert accuracy(logits, torch.tensor([0, 4, 5])) == pytest.approx(1 / 3)
    three = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    assert top5_accuracy(three, torch.arange(20) % 3) == 1.0  # k = min(5, classes): every label is in the top 3
    # Ties: all-equal scores; argmax says class 0, and top-5 counts that hit whatever order topk returns.
    tied = torch.zeros(4, 10)
    assert top5_accuracy(tied, torch.zeros(4, dtype=torch.long)) == 1.0 == accuracy(tied, torch.zeros(4).long())


def test_paired_bootstrap_by_hand():
    mean, lo, hi = paired_bootstrap([0.03] * 7)  # identical differences: the interval has zero width
    assert mean == pytest.approx(0.03) and lo == pytest.approx(0.03) and hi == pytest.approx(0.03)
    diffs = [0.01, 0.05, -0.02, 0.08, 0.03, 0.00, 0.04, 0.06]
    mean, lo, hi = paired_bootstrap(diffs)
    assert mean == pytest.approx(sum(diffs) / 8) and lo < mean < hi
    assert min(diffs) < lo and hi < max(diffs)  # a mean's interval is narrower than the data's range
    assert paired_bootstrap(diffs) == (mean, lo, hi)  # seeded: the same report twice
    assert paired_bootstrap(diffs, seed=1) != (mean, lo, hi)
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([])


def test_seed_spread_by_hand():
    std, lo, hi = seed_spread([0.6, 0.7, 0.8])
    assert std == pytest.approx(0.1) and (lo, hi) == (0.6, 0.8)  # ddof=1: sqrt((0.01 + 0 + 0.01) / 2)
    assert seed_spread([0.6]) == (None, None, None)


def _grid(model="m"):
    """source and replace (2 seeds) on 2 benchmark cells and a held-out one; replace gains 0.1 and 0.3."""
    rows = [_row("source", c=c, s=s, acc=a, model=model, top5=0.9) for c, s, a in (("fog", 1, 0.5), ("fog", 5, 0.3),
            ("spatter", 1, 0.4))]  # fmt: skip
    for seed, shift in ((0, 0.0), (1, 0.02)):
        rows += [_row("replace", 8, seed, "fog", 1, 0.6 + shift, model), _row("replace", 8, seed, "fog", 5, 0.6 + shift,
                 model), _row("replace", 8, seed, "spatter", 1, 0.9, model)]  # fmt: skip
    return rows


def test_summary_diff_to_source_and_seed_spread():
    src, rep = summarize(_grid())
    # Per cell, replace (mean over seeds 0.61) minus source: 0.11 on fog 1, 0.31 on fog 5; spatter is held out.
    assert rep["diff_to_source"] == pytest.approx(0.21) == rep["mean_acc"] - src["mean_acc"]
    lo, hi = rep["diff_to_source_ci95"]
    assert 0.11 - 1e-9 <= lo < 0.21 < hi <= 0.31 + 1e-9 and rep["diff_cells"] == 2
    assert rep["diff_to_source_note"] is None
    assert rep["seed_std"] == pytest.approx(0.02 / 2**0.5) == rep["mean_acc_std"]  # seed means 0.60 and 0.62
    assert (rep["seed_min"], rep["seed_max"]) == pytest.approx((0.6, 0.62))
    assert src["seed_std"] is None and src["mean_acc_std"] == 0.0 and src["diff_to_source"] is None
    assert "reference" in src["diff_to_source_note"]
    alone = summarize([r for r in _grid() if r["method"] != "source"])[0]
    assert alone["diff_to_source"] is None and alone["diff_to_source_ci95"] is None
    assert "no source rows of model m" in alone["diff_to_source_note"]
    json.dumps(summarize(_grid()), allow_nan=False)  # valid JSON throughout


def test_top5_in_summaries_and_older_rows_without_it():
    src, rep = summarize(_grid())
    assert src["top5"]["mean_acc"] == pytest.approx(0.9) and src["top5"]["per_corruption"]["spatter"] == 0.9
    assert rep["top5"] is None  # rows of a version before top-5: none, not a made-up number
    mixed = _grid() + [_row("source", c="contrast", s=1, acc=0.5)]  # a cell resumed from an older run
    src = summarize(mixed)[0]
    assert src["top5"]["mean_acc"] is None and src["top5"]["per_corruption"]["fog"] == pytest.approx(0.9)
    assert src["mean_acc"] == pytest.approx(1.3 / 3)  # top-1 is untouched


def test_force_mix_does_not_count_the_other_commands_rows(tmp_path):
    Journal(tmp_path, HEADER).append([_row()])
    mixed = Journal(tmp_path, {**HEADER, "fingerprint": {"data": "b"}}, force=True)
    assert mixed.done == set()
    assert Journal(tmp_path, HEADER, force=True).done == {("m", "source", 0, None, "fog", 1)}


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tmp_path, caplog):
    import subprocess
    import sys

    from bnadapt.results import LOCK

    header = {"command": ["bench"], "fingerprint": {"data": "x"}}
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / LOCK).write_text(f"{live.pid}\n")
        with pytest.raises(ValueError, match=f"process {live.pid} holds"):
            Journal(tmp_path / "r", header)
    finally:
        live.kill()
        live.wait()
    # The same pid, now dead: a stale lock, taken over with a warning.
    j = Journal(tmp_path / "r", header)
    assert "stale lock" in caplog.text and (tmp_path / "r" / LOCK).read_text().strip() != str(live.pid)
    j.close()
    assert not (tmp_path / "r" / LOCK).exists()
