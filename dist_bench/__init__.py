"""dist-bench: what LLM distillation costs (energy, time, tokens, carbon) and what it buys, in MLflow."""

import os

# MLflow's usage telemetry, when its config fetch fails (always, on an offline cluster), pops a variable
# from os.environ in a background thread. Anything reading the environment at that instant (httpx's
# proxy lookup in the API teacher, subprocess, the redaction of secrets) then dies with KeyError: it
# failed a CI run of this project. Off unless the user asks for it (MLFLOW_DISABLE_TELEMETRY=false).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
