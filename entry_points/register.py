"""MLproject entry point `register`: `mlflow run . -e register` runs this; same as `dist-bench register`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, installed or not

from dist_bench.cli import run_entry_point

if __name__ == "__main__":
    run_entry_point("register")
