"""Atomic writes: a file is the old one or the complete new one, never a partial one."""

from __future__ import annotations

import contextlib
import csv
import json
import os

import matplotlib.pyplot as plt
import PIL.Image
import pytest
import torch

from eblvm.atomic import replacing, write_json, write_text
from eblvm.evaluation.plots import save_figure, save_image_grid
from eblvm.loggers import AppendingExperimentWriter


def test_the_target_changes_only_when_the_block_ends(tmp_path):
    target = tmp_path / "deep" / "summary.json"
    write_json(target, {"step": 1})
    with replacing(target) as partial:
        partial.write_text("{")
        assert json.loads(target.read_text()) == {"step": 1}
    assert target.read_text() == "{"
    assert sorted(path.name for path in target.parent.iterdir()) == ["summary.json"]


def test_an_atomic_write_gives_the_file_the_usual_permissions(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_an_error_mid_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    target = write_text(tmp_path / "outcomes.md", "old\n")
    with pytest.raises(OSError, match="disk full"), replacing(target) as partial:
        partial.write_text("half of the new")
        raise OSError("disk full")
    assert target.read_text() == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["outcomes.md"]


def _write_half_then_fail(image, fp, *args, **kwargs):
    """PIL's ``Image.save`` stopped by a full disk after the first bytes."""
    with open(fp, "wb") if isinstance(fp, str | os.PathLike) else contextlib.nullcontext(fp) as file:
        file.write(b"\x89PNG")
    raise OSError("disk full")


def _figure(path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    return save_figure(fig, path)


def _grid(path):
    return save_image_grid(torch.rand(4, 1, 8, 8), path)


@pytest.mark.parametrize("writer", [_figure, _grid], ids=["figure", "image grid"])
def test_a_png_whose_write_fails_keeps_the_previous_one(tmp_path, monkeypatch, writer):
    target = writer(tmp_path / "samples.png")
    previous = target.read_bytes()
    monkeypatch.setattr(PIL.Image.Image, "save", _write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        writer(target)
    assert target.read_bytes() == previous
    assert not plt.get_fignums(), "the figure is closed even when its write fails"
    assert [path.name for path in tmp_path.iterdir()] == ["samples.png"]


def _metrics_with_a_new_column(tmp_path) -> AppendingExperimentWriter:
    """A writer that has saved a row of ``train/loss`` and holds a row with the new column ``val/objective``."""
    writer = AppendingExperimentWriter(log_dir=str(tmp_path))
    writer.log_metrics({"train/loss": 1.0}, step=0)
    writer.save()
    writer.log_metrics({"val/objective": 2.0}, step=1)
    return writer


def test_a_new_column_rewrites_metrics_csv_with_every_row(tmp_path):
    _metrics_with_a_new_column(tmp_path).save()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(row["train/loss"], row["val/objective"]) for row in rows] == [("1.0", ""), ("", "2.0")]


def test_a_failed_rewrite_for_a_new_column_keeps_metrics_csv(tmp_path, monkeypatch):
    """Lightning rewrites the whole file when a column appears; a failure while writing the new one keeps the rows."""
    writer = _metrics_with_a_new_column(tmp_path)
    before = (tmp_path / "metrics.csv").read_text()
    monkeypatch.setattr(csv.DictWriter, "writerows", lambda self, rows: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        writer.save()
    assert (tmp_path / "metrics.csv").read_text() == before
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.csv"]
