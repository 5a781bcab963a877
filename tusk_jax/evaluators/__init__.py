"""One evaluator per task (SPEC 6), chosen once from the dataset's `DatasetInfo.task`.

Each evaluator streams a split with `add(batch, outputs)` and gives its
metrics with `result()`; its metric functions live beside it.
"""

from tusk_jax.evaluators import base, landmarks, multi_instance, object_discovery
from tusk_jax.evaluators import purity as purity  # The printed table's per-prototype lines.

EVALUATORS: dict[str, type[base.Evaluator]] = {
    "object_discovery": object_discovery.ObjectDiscoveryEvaluator,
    "multi_instance": multi_instance.MultiInstanceEvaluator,
    "landmarks": landmarks.LandmarkEvaluator,
}
TASKS = tuple(EVALUATORS)


def evaluator_class(task: str) -> type[base.Evaluator]:
    """The evaluator of `task`; ValueError naming the valid tasks otherwise."""
    if task not in EVALUATORS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}.")
    return EVALUATORS[task]
