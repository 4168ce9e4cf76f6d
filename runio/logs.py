"""Run logs: one row of scalars per log interval, to `logs.csv` and to TensorBoard, both keyed by one counter
(environment frames for RL, optimiser steps for the supervised tasks)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from runio.files import atomic_path, write_failure


class RunLogger:
    """Appends rows to `run_dir/logs.csv` and writes TensorBoard scalars to `run_dir`.

    Args:
        run_dir: the run directory (created by the caller).
        start: the counter of the checkpoint the run resumes from (0 for a new run). Rows and events that an
            interrupted session logged after it are dropped, and the ones up to it kept, so that the logs read
            as if the run had never stopped: every counter value appears once.
        x_key: the row key that is the x axis: "frames" or "step".
    """

    def __init__(self, run_dir: str | Path, start: int = 0, x_key: str = "frames"):
        self.csv_path = Path(run_dir) / "logs.csv"
        self.x_key = x_key
        self.fieldnames: list[str] | None = None
        self.last_row: dict[str, str] | None = None  # the last row kept, for counters that continue across resumes
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self.fieldnames = reader.fieldnames
                rows = [row for row in reader if _counter(row.get(x_key)) <= start] if start > 0 else []
            with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.fieldnames or [])
                if self.fieldnames and rows:
                    writer.writeheader()
                    writer.writerows(rows)
                else:
                    self.fieldnames = None
            self.last_row = rows[-1] if rows else None
        self.writer = SummaryWriter(str(run_dir), purge_step=start + 1 if start > 0 else None)

    def log(self, row: dict[str, float | int]) -> None:
        """Write one row; `row[x_key]` is the x axis. Keys unknown to an existing CSV header go to TensorBoard
        only."""
        try:
            with open(self.csv_path, "a", newline="") as f:
                if self.fieldnames is None:
                    self.fieldnames = list(row)
                    csv.DictWriter(f, self.fieldnames).writeheader()
                csv.DictWriter(f, self.fieldnames, extrasaction="ignore").writerow(row)
        except OSError as e:
            raise write_failure(e, self.csv_path) or e from None
        for key, value in row.items():
            if key != self.x_key and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(key, value, global_step=row[self.x_key])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _counter(value: str | None) -> float:
    """A row's x value; rows whose counter is not a number (e.g. a header written twice) sort after everything."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf
