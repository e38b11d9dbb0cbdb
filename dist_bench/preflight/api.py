"""An API teacher (teacher.api): its key is in the environment, the server answers with it, and it serves
the model; all before any run opens, and without spending anything (GET /models only)."""

from __future__ import annotations

import os

from dist_bench.config import ApiTeacherConfig
from dist_bench.preflight.base import Check, PreflightError
from dist_bench.redact import treat_as_secret

PROBE_TIMEOUT_S = 15.0


def api_teacher(api: ApiTeacherConfig, field: str = "teacher.api") -> Check:
    """`field`: where the API is configured (teacher.api, preferences.judge.api), for the messages."""
    import openai

    key = ""
    if api.api_key_env:
        treat_as_secret(api.api_key_env)  # masked in every message from here on, whatever its name
        key = os.environ.get(api.api_key_env, "")
        if not key:
            raise PreflightError(
                f"{field}.api_key_env: the environment variable {api.api_key_env} is not set (it holds "
                "the API key; the key itself never goes in config)"
            )
    client = openai.OpenAI(
        base_url=api.base_url, api_key=key or "none", max_retries=1, timeout=PROBE_TIMEOUT_S
    )
    try:
        served = [model.id for model in client.models.list()]
    except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
        named = f"the key in {api.api_key_env}" if api.api_key_env else f"no key ({field}.api_key_env unset)"
        raise PreflightError(
            f"{field}.api_key_env: {api.base_url} refused {named} ({err.status_code})"
        ) from None
    except openai.NotFoundError:  # a server without /models: nothing more to check without spending
        return Check(field, f"{api.base_url} answers (no /models list); model {api.model}")
    except openai.APIConnectionError as err:
        raise PreflightError(
            f"{field}.base_url: cannot reach {api.base_url} ({type(err).__name__})"
        ) from None
    except openai.APIStatusError as err:
        raise PreflightError(f"{field}.base_url: {api.base_url}/models answered {err.status_code}") from None
    finally:
        client.close()
    if api.model not in served:
        raise PreflightError(
            f"{field}.model: {api.base_url} does not serve {api.model!r} (it serves: {', '.join(served[:10])})"
        )
    budget = f"budget {api.budget:g}" if api.budget is not None else "no budget limit"
    return Check(field, f"{api.base_url} serves {api.model}; key accepted; {budget}")
