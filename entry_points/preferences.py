"""MLproject entry point `preferences`: `mlflow run . -e preferences` runs this; same as `dist-bench preferences`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, installed or not

from dist_bench.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point("preferences")
