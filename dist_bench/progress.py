"""How far a long stage has got, for a person watching it: a bar with an ETA on a terminal (tqdm), and plain
log lines (at most every DIST_BENCH_PROGRESS_EVERY_S seconds, default 30, and at the end) when the output is
not a terminal (CI, `mlflow run` logs), where a bar would be thousands of carriage returns.

    with Progress("student_train", total=3_000_000, unit="tokens") as progress:
        progress.set(tokens_so_far)

Stages report their own units: tokens against the budget in training, prompts in generation, shards in
logit caching, tasks in eval. lm-eval's per-request bars stay off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(
        self,
        what: str,
        total: float,
        unit: str,
        done: float = 0.0,
        stream: TextIO | None = None,
        shown: bool = True,
    ) -> None:
        """`shown=False`: count, print nothing (a rank doing the same work as rank 0, which reports it)."""
        self.what, self.total, self.unit, self.done, self.shown = what, float(total), unit, float(done), shown
        self.stream = stream or sys.stderr
        self.every_s = float(os.environ.get("DIST_BENCH_PROGRESS_EVERY_S", "30"))
        self.started = self.last_line = time.monotonic()
        self.at_start = self.done  # work found done (a resumed stage) does not speed up the ETA
        self._bar: Any = None
        if shown and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, unit=unit, desc=what, file=self.stream,
                             dynamic_ncols=True, unit_scale=True)  # fmt: skip

    def set(self, done: float) -> None:
        """The work done so far (not an increment: a callback knows the total it has reached)."""
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = float(done)
        if self._bar is None and time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def advance(self, amount: float = 1.0) -> None:
        self.set(self.done + amount)

    def line(self) -> str:
        """`<what>: <done>/<total> <unit> (<pct>%), <elapsed> s, ETA <s> s` from the rate since the start."""
        elapsed = time.monotonic() - self.started
        share = self.done / self.total if self.total else 1.0
        rate = (self.done - self.at_start) / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 and self.done < self.total else "-"
        return (
            f"{self.what}: {self.done:,.0f}/{self.total:,.0f} {self.unit} ({100 * share:.0f}%), "
            f"{elapsed:.0f} s, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        if self.shown:
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
