"""Credentials never leave the process: what dist-bench prints, logs, tags or writes goes through `redact`.

    redact("http://user:hunter2@mlflow:5000 is not reachable")  # 'http://user:***@mlflow:5000 is not reachable'

Two kinds of secret are masked: the password part of any URI (`scheme://user:password@host`, the form some
tracking servers and OpenAI-compatible endpoints are reached by) and the value of every environment
variable whose name says it holds a secret (`*_TOKEN`, `*_API_KEY`, `*_PASSWORD`, ...), wherever such a
value turns up in the text.
"""

from __future__ import annotations

import os
import re

MASK = "***"
# scheme://user:password@  (the user is kept: it tells which account without unlocking it)
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<password>[^/\s@]+)@")
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I
)
_SHORTEST_SECRET = 6  # shorter values ("true", "1") would mask ordinary words


_SECRET_VARIABLES: set[str] = set()  # named as secrets by the config (teacher.api.api_key_env)


def treat_as_secret(variable: str) -> None:
    """Mask this environment variable's value too, whatever its name."""
    _SECRET_VARIABLES.add(variable)


def environ_snapshot() -> dict[str, str]:
    """A copy of the environment. Iterating os.environ while another thread sets or pops a variable
    (MLflow's telemetry thread does) raises KeyError or RuntimeError: copy again."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def secret_values() -> list[str]:
    """Values of environment variables named like secrets, longest first (so none is masked in part)."""
    values = {
        value
        for name, value in environ_snapshot().items()
        if (_SECRET_NAME.search(name) or name in _SECRET_VARIABLES) and len(value) >= _SHORTEST_SECRET
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with URI passwords and secret environment values replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


def has_credentials(uri: str) -> bool:
    return _USERINFO.search(uri) is not None
