"""Evaluation: lm-eval task YAMLs (configs/tasks/) run through lm-eval's HF model, with token counts."""

from dist_bench.evaluation.harness import CountingHFLM, EvalOutcome, run_lm_eval

__all__ = ["CountingHFLM", "EvalOutcome", "run_lm_eval"]
