"""Errors shared by modules that must stay light to import.

`DataError` lives here rather than in dataset.py because dataset.py imports torch and transformers, and the
data sources, recipes, CLI and pre-flight need the class without paying for those imports (or importing
dataset.py in a cycle: dataset.py reads through data/sources.py).
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad training data, phrased as one line naming the file and line (or row) and the field."""
