"""The evaluate stage (`lmforge evaluate`): perplexity, generation and choice tasks, reports, the gate.

- `suite.py`: the task-suite YAML, validated with every item before any model loads,
- `scoring.py`: rolling log-likelihood windows, continuation splitting, batched generation,
- `tasks.py`: one runner per task type (metrics + cost + samples),
- `metrics.py`: sacrebleu / rouge-score / SQuAD / lm-evaluation-harness metric definitions,
- `gate.py`: rules over TASK.METRIC (min / max / max_regression vs a baseline),
- `report.py`: metrics.json, report.md, samples.jsonl, PNG plots,
- `stage.py`: `evaluate(...)`, the plain function the CLI calls (and MLflow logging),
- `decontaminate.py`: n-gram overlap with a training split; `harness.py`: an lm-evaluation-harness model.
"""

from lmforge.components.evaluate.stage import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
