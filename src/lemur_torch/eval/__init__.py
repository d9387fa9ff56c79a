"""Evaluation of exports and runs: HumanEval with sandboxed execution, lm-evaluation-harness tasks (lemur-eval),
and the run report (lemur-report). See docs/evaluation.md."""
