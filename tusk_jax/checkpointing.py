"""Checkpoints of a run: the `TrainState` and the input pipeline's position.

An orbax `CheckpointManager` in `<workdir>/checkpoints` holds, per step, two
items: `state` (the whole `tusk_jax.state.TrainState` pytree) and `data` (the
train iterator's position, JSON). Orbax writes each step to a temporary
folder and renames it when complete, so a run killed mid-save restores the
previous complete step; saves are asynchronous (training goes on while the
files are written).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(workdir: str, max_to_keep: int = 3, use_async: bool = True):
    """An orbax `CheckpointManager` for `<workdir>/checkpoints`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=use_async, create=True
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("state", "data")
    )


def save(manager, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    """Saves a host (unreplicated) state and the data position at `step`."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
    )
    return manager.save(int(step), args=args, force=force)


def restore(manager, template: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
    """Restores `(state, data_state, step)` at `step` (default: latest), or None if empty.

    `template` is a host state of the right structure, shapes and dtypes
    (e.g. a freshly initialised one, `jax.device_get`); the restored arrays
    are numpy arrays like it, and its non-pytree fields are kept.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {manager.directory}; "
            f"available: {sorted(manager.all_steps())}."
        )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.device_get(template)), data=ocp.args.JsonRestore()
        ),
    )
    return restored.state, dict(restored.data or {}), step
