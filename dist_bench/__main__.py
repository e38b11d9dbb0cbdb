"""`python -m dist_bench ...` is the `dist-bench` command."""

from dist_bench.cli import app

app()
