"""Which run a workdir and each of its checkpoints belong to.

A run gets a run id at its first start (`new_run_id()`: start time and a
random suffix, e.g. `20250101-120000-1a2b3c4d`). It is kept in the run's
`config.json` under the key `run_identity` (`config_lib.RUN_KEY`, left out
of the config `config_lib.load_config` returns):

    "run_identity": {"run_id": "...", "created": "2025-01-01T12:00:00+0000",
                     "adopted": [{"step": 6, "run_id": "...", "config_sha256": "...",
                                  "time": "..."}]}

Every checkpoint step carries `{"run_id", "config_sha256"}` in orbax's step
metadata (`<step>/_CHECKPOINT_METADATA`, `custom_metadata`), so the identity
travels with a copied step folder. `config_sha256` is `config_digest` of the
config the step was trained with (fields that change what is trained; the
HARMLESS ones of `config_lib.RESUME_CHANGES`, such as `train.num_steps`,
left out).

On resume (`check_step`) a step of another run is refused with one line
naming both run ids and the fix, unless adopted (`--adopt_checkpoint`), which
is recorded in `config.json` (`adopted`) and logged. Steps without an
identity (saved before it existed) are treated as unknown: resumed, with one
warning.

For a workdir whose first checkpoint is made outside training (a converter of
pretrained weights), `write_run_identity(workdir, config)` writes
`config.json` with a new identity and returns the metadata to save with the
step: `checkpointing.save(manager, 0, state, data_state, identity=...)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

import ml_collections
from absl import logging

from tusk_jax import config_lib
from tusk_jax.checkpoint_integrity import CheckpointError

_WARNED: set = set()  # Steps without identity already reported (one warning each).


class ForeignCheckpointError(CheckpointError):
    """A checkpoint step was saved by another run (a copied step folder)."""


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def config_digest(config: ml_collections.ConfigDict) -> str:
    """SHA-256 (hex) of the config's fields that change what is trained.

    Computed from the JSON `config.json` would hold, without the HARMLESS
    fields of `config_lib.RESUME_CHANGES` (how long, how often, where).
    """
    flat = config_lib.flat_json(config)
    harmless = config_lib.HARMLESS
    kept = {k: v for k, v in flat.items() if config_lib.RESUME_CHANGES.get(k) != harmless}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def for_run(workdir: str) -> dict:
    """The workdir's identity from its `config.json`, or a new one (first start, old runs)."""
    saved = config_lib.load_run_identity(workdir)
    if saved and saved.get("run_id"):
        return {"adopted": [], **saved}
    return {"run_id": new_run_id(), "created": _now(), "adopted": []}


def step_metadata(identity: dict, config: ml_collections.ConfigDict) -> dict:
    """What each saved step carries: `{"run_id", "config_sha256"}`."""
    return {"run_id": identity["run_id"], "config_sha256": config_digest(config)}


def write_run_identity(
    workdir: str, config: ml_collections.ConfigDict, run_id: str | None = None
) -> dict:
    """Starts a run's identity in a new `workdir`: writes `config.json` with it.

    For workdirs whose first checkpoint is written outside training (e.g. a
    converter of pretrained weights); training makes its own at the first
    start. Save the step with the returned metadata, e.g.
    `checkpointing.save(manager, 0, state, data_state, identity=metadata)`,
    and `python -m tusk_jax.main` resumes it as this run's.

    Returns:
      `{"run_id", "config_sha256"}` to pass to `checkpointing.save(identity=...)`.
    """
    identity = {"run_id": run_id or new_run_id(), "created": _now(), "adopted": []}
    os.makedirs(workdir, exist_ok=True)
    config_lib.save_config(config, workdir, identity=identity)
    return step_metadata(identity, config)


def read_step(manager, step: int) -> dict:
    """The `{"run_id", "config_sha256"}` saved with `step`; {} when it has none."""
    try:
        custom = manager.metadata(step).custom_metadata
    except Exception as error:  # noqa: BLE001 - old or unreadable step metadata
        logging.debug("No step metadata for step %d: %s", step, error)
        return {}
    return dict(custom or {}) if isinstance(custom, dict) else {}


def check_step(
    manager,
    step: int,
    identity: dict,
    config: ml_collections.ConfigDict,
    adopt: bool = False,
) -> bool:
    """Accepts `step` for resuming the run `identity`; True when it is adopted now.

    Accepted: a step of this run, a step adopted before (`identity["adopted"]`),
    a step without identity (one warning), or any step when `adopt` (then
    appended to `identity["adopted"]`: the caller writes it to config.json).

    Raises:
      ForeignCheckpointError: the step belongs to another run (one line).
    """
    found = read_step(manager, step)
    location = os.path.join(str(manager.directory), str(step))
    found_id = found.get("run_id")
    run_id = identity["run_id"]
    if not found_id:
        if location in _WARNED:
            return False
        _WARNED.add(location)
        logging.warning(
            "Checkpoint step %d in %s has no run id (saved before run ids existed): resumed as "
            "run %s's own.",
            step,
            location,
            run_id,
        )
        return False
    if found_id == run_id or any(
        a.get("step") == int(step) and a.get("run_id") == found_id for a in identity["adopted"]
    ):
        return False
    digest = config_digest(config)
    found_digest = str(found.get("config_sha256", "?"))
    if not adopt:
        same = " (the same)" if found_digest == digest else ""
        raise ForeignCheckpointError(
            f"checkpoint step {step} in {location} belongs to run {found_id} (config "
            f"{found_digest[:12]}), not to this workdir's run {run_id} (config {digest[:12]}"
            f"{same}): it was copied from another run. Move it away to resume this run's own "
            "steps, or pass --adopt_checkpoint to go on from it as this run (recorded in "
            "config.json)."
        )
    identity["adopted"].append(
        {"step": int(step), "run_id": found_id, "config_sha256": found_digest, "time": _now()}
    )
    logging.warning(
        "Adopting checkpoint step %d of run %s (config %s) as run %s (--adopt_checkpoint; "
        "recorded in config.json).",
        step,
        found_id,
        found_digest[:12],
        run_id,
    )
    return True
