"""What every check returns or raises."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_bench.config import RunConfig


class PreflightError(ValueError):
    """A bad input, phrased as the one line the user sees: the field, file and line, URI or option first."""


@dataclass
class Check:
    name: str  # the field, option or resource checked
    detail: str  # what was found


# what a message about a config field starts with: "data.train: ...", "train.device=cuda: ..."
_LEADING_FIELD = re.compile(r"([a-z_]+(?:\.[A-Za-z0-9_-]+)+)[:=]")


def located(err: PreflightError, cfg: RunConfig) -> PreflightError:
    """`err` with the config file and line of the field it starts with put first, as compilers do:
    "configs/x.yaml:16: data.train: /nope.jsonl: not found". Unchanged where the field's value is a default
    or a command-line override, or the message names no field."""
    message = str(err)
    field = _LEADING_FIELD.match(message)
    where = cfg.line_of(field.group(1)) if field else None
    return PreflightError(f"{where}: {message}") if where else err
