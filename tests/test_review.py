"""The corrections' quarantine (pipelines/review.py): pending digits with the model's answer, and
the review that lets them into data/incoming/<label>/ or throws them out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines import review
from pipelines.merge import png_digit
from tests.conftest import draw_stroke


def digit(seed: int) -> np.ndarray:
    return draw_stroke(np.random.default_rng(seed))


def pend(incoming, seed: int, label: int, model_digit: int = 1):
    answer = {"digit": model_digit, "confidence": 0.62, "version": "4"}
    meta = {"answer": answer, "client": "127.0.0.1", "received_at": f"2026-12-02T10:0{seed}:00"}
    return review.save_pending(digit(seed), label, meta, incoming)


def test_a_correction_waits_with_its_record_and_the_model_answer(tmp_path):
    png = pend(tmp_path, 1, label=7)
    assert png.parent == tmp_path / "pending" and png.with_suffix(".json").exists()
    assert not list(tmp_path.glob("[0-9]"))  # nothing where merge reads
    (item,) = review.waiting(tmp_path)
    assert item.label == 7 and item.answer["digit"] == 1 and item.id == png.stem
    np.testing.assert_array_equal(item.digit(), digit(1))
    text = review.describe(item)
    assert f"{item.id}  label 7  model said 1 (62%, v4)" in text
    assert len(text.splitlines()) == 1 + 14  # the header and the digit, two rows per line
    assert review.count_waiting(tmp_path) == 1


def test_accept_moves_to_the_label_folder_and_reject_deletes_both_with_a_log(tmp_path, capsys):
    first, second = pend(tmp_path, 1, label=7), pend(tmp_path, 2, label=3)
    assert review.main(["accept", first.stem[:6], "--incoming", str(tmp_path)]) == 0
    reason = ["--reason", "a 5, not a 3"]
    assert review.main(["reject", second.stem[:6], *reason, "--incoming", str(tmp_path)]) == 0
    accepted = tmp_path / "7" / first.name
    np.testing.assert_array_equal(png_digit(accepted.read_bytes()), digit(1))
    assert not list((tmp_path / "pending").iterdir())
    assert not (tmp_path / "3").exists()
    log = [json.loads(line) for line in (tmp_path / ".review.jsonl").read_text().splitlines()]
    assert [(e["id"], e["decision"]) for e in log] == [
        (first.stem, "accepted"),
        (second.stem, "rejected"),
    ]
    assert log[1]["reason"] == "a 5, not a 3" and log[0]["file"] == f"7/{first.name}"
    assert "accepted" in capsys.readouterr().out


def test_an_unknown_or_ambiguous_id_is_an_error_naming_it(tmp_path, capsys):
    pend(tmp_path, 1, label=7)
    assert review.main(["accept", "zzzz", "--incoming", str(tmp_path)]) == 2
    assert "id 'zzzz' matches no pending correction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        review.main(["accept", "--incoming", str(tmp_path)])  # neither ids nor --all
    assert review.count_waiting(tmp_path) == 1


def test_list_shows_every_waiting_digit(tmp_path, capsys):
    pend(tmp_path, 1, label=7)
    pend(tmp_path, 2, label=3)
    assert review.main(["--incoming", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(" label ") == 2 and "2 correction(s) waiting" in out
