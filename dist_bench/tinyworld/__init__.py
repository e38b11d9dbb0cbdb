"""The embedded offline default: a byte-level tokenizer, a tiny teacher and student (Llama architecture)
and a generated task corpus, all shipped under `assets/` and rebuilt by `python -m dist_bench.tinyworld.build`.

Configs name these as `tinyworld:<name>`: `tinyworld:teacher`, `tinyworld:student-init` (model dirs) and
`tinyworld:kd_train` (a corpus split). Everything else in the project treats the resolved paths exactly
like a user's local model dir or data file.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
PREFIX = "tinyworld:"


def resolve(spec: str) -> str:
    """Map `tinyworld:<name>` to its shipped path; return any other spec unchanged."""
    if not spec.startswith(PREFIX):
        return spec
    name = spec[len(PREFIX) :]
    for candidate in (ASSETS / name, ASSETS / "data" / f"{name}.jsonl"):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        f"{spec}: no such tiny-world asset under {ASSETS} (run python -m dist_bench.tinyworld.build)"
    )
