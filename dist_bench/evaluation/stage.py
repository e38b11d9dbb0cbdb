"""Stage `eval`: lm-eval on the local task YAMLs for any model spec, inside an energy window.

    dist-bench eval --model tinyworld:teacher --config configs/experiments/tiny_kd.yaml

In the KD pipeline the model is the `student_train` stage's final model (its content hash is the reuse
key, so a retrained student is always re-evaluated). Logs `eval/<task>/<metric>` on the stage run and
the parent, and the per-task lm-eval results JSON as artifacts.
"""

from __future__ import annotations

from dist_bench import models
from dist_bench.config import flatten
from dist_bench.evaluation.harness import run_lm_eval
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

STAGE = "eval"


def run(parent: ParentRun, model: str, fingerprint: str | None = None, dtype: str = "auto") -> StageResult:
    cfg = parent.cfg
    params = {
        **flatten(cfg.eval.model_dump(), "eval."),
        "seed": str(cfg.seed),
        "model": model if fingerprint is None else "<upstream final_model>",
        "model.fingerprint": fingerprint or models.fingerprint(model),
        "model.dtype": dtype,
        "device": models.pick_device(cfg.eval.device).type,
    }

    def work(ctx: StageContext) -> StageWork:
        out = ctx.stage_dir / "lm_eval"
        outcome = run_lm_eval(model, cfg.eval, out, seed=cfg.seed, dtype=dtype)
        return StageWork(
            tokens=outcome.tokens,
            outputs={"lm_eval": out},
            fingerprints={},
            metrics={
                **{f"eval/{name}": value for name, value in outcome.metrics.items()},
                "prefill_tokens": outcome.prefill_tokens,
                "decode_tokens": outcome.decode_tokens,
            },
            details={"model": model, "tasks": cfg.eval.tasks},
        )

    return execute_stage(parent, STAGE, params, work, tags={"dist_bench.eval_model": model})
