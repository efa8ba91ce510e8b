from __future__ import annotations

import csv

from eblvm.loggers import CSVLogger


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_new_logger_appends_new_columns_to_an_existing_metrics_file(tmp_path):
    first = CSVLogger(tmp_path, name="", version="")
    first.log_metrics({"val/objective": 1.5}, step=10)
    first.save()

    second = CSVLogger(tmp_path, name="", version="")
    second.log_metrics({"test/objective": 2.5, "test/log_likelihood": -3.0}, step=20)
    second.save()

    rows = read_rows(tmp_path / "metrics.csv")
    assert [row["step"] for row in rows] == ["10", "20"]
    assert rows[0]["val/objective"] == "1.5" and rows[0]["test/objective"] == ""
    assert rows[1]["test/objective"] == "2.5" and rows[1]["test/log_likelihood"] == "-3.0"
    assert rows[1]["val/objective"] == ""
