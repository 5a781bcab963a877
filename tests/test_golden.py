"""Golden numbers: a `configs/tetrominoes.py:test` run and its evaluation, bit for bit.

Refactors must not change a number. This test compares the `metrics.jsonl` of
conftest's `trained_tetrominoes` run (every logged value, wall-clock fields
left out) and the `eval/<step>/metrics.json` of `evaluate` on it (as the
`python -m tusk_jax.evaluate` command writes it; paths left out) with the
files under `tests/golden/`. Floats are compared exactly (JSON keeps every
bit of a Python float). The evaluation is compared on the golden file's fields
(`recorded_fields`): a metric or figure added later is not in the golden file
and leaves it valid; a recorded one that changes or disappears fails.

The files change only on request, when a change of numbers is intended
(explain it in the commit):

  TUSK_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

They hold what the two host CPU devices of `conftest.py` compute. XLA's CPU
code depends on the processor (an AMD EPYC without AVX-512 differs from the
machine of the first recording in the last bit of the first step, and four
steps amplify that to a few per cent), so each platform has its own set:
`tests/golden/tetrominoes_test/<vendor>_<simd>/` (`platform_key`), written by
the update above. A run must equal its platform's set bit for bit, or, on a
platform without one, one of the recorded sets; a changed number matches none.
"""

import json
import os
import shutil

import pytest

from tusk_jax import evaluate, summaries

GOLDEN_ROOT = os.path.join(os.path.dirname(__file__), "golden", "tetrominoes_test")
UPDATE = os.environ.get("TUSK_JAX_UPDATE_GOLDEN") == "1"
# Fields that measure time or name this machine's folders, not the model.
WALL_CLOCK_FIELDS = ("steps_per_second",)
PATH_FIELDS = ("workdir", "eval_dir", "figures")


def training_records(workdir: str) -> list[dict]:
    return [
        {k: v for k, v in record.items() if k not in WALL_CLOCK_FIELDS}
        for record in summaries.read_metrics(workdir)
    ]


def evaluation_record(workdir: str) -> dict:
    """`evaluate` as the command line runs it; its metrics.json without paths."""
    result = evaluate.evaluate(None, workdir, progress=False)
    with open(os.path.join(result["eval_dir"], "metrics.json")) as f:
        saved = json.load(f)
    saved["figures"] = sorted(saved["figures"])  # The names only.
    return {k: v for k, v in saved.items() if k not in PATH_FIELDS[:2]}


def platform_key() -> str:
    """`<cpu vendor>_<widest SIMD>` of this machine, e.g. `AuthenticAMD_avx2`."""
    vendor, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "vendor_id":
                    vendor = value.strip()
                elif name.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    simd = next((s for s in ("avx512f", "avx2", "avx") if s in flags), "other")
    return f"{vendor}_{simd.replace('avx512f', 'avx512')}"


PLATFORM = platform_key()


def recorded_fields(found, golden):
    """`found` cut down to the fields `golden` records (dict keys, figure names).

    Dicts keep the golden's keys that `found` has (a missing one stays missing,
    so the comparison fails); lists of names (the figures) keep the golden's
    names; lists of the same length are cut element by element; anything else
    is returned unchanged.
    """
    if isinstance(found, dict) and isinstance(golden, dict):
        return {k: recorded_fields(found[k], golden[k]) for k in golden if k in found}
    if isinstance(found, list) and isinstance(golden, list):
        if all(isinstance(v, str) for v in found + golden):
            return [v for v in found if v in golden]
        if len(found) == len(golden):
            return [recorded_fields(f, g) for f, g in zip(found, golden, strict=True)]
    return found


def _check(name: str, found, fields_of_golden: bool = False) -> None:
    """Asserts `found` equals a recorded golden file `name` (with `fields_of_golden`,
    on that file's fields only, `recorded_fields`); writes it under UPDATE."""
    # Round-trip through JSON so both sides hold the same types (NaN as strings).
    found = json.loads(json.dumps(found))
    if UPDATE:
        folder = os.path.join(GOLDEN_ROOT, PLATFORM)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(found, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    sets = sorted(
        d for d in os.listdir(GOLDEN_ROOT) if os.path.exists(os.path.join(GOLDEN_ROOT, d, name))
    )
    if not sets:
        pytest.fail(
            f"no recorded {name} under {GOLDEN_ROOT}; generate it with TUSK_JAX_UPDATE_GOLDEN=1."
        )
    # This platform's own set when it has one; otherwise any recorded set.
    candidates = [PLATFORM] if PLATFORM in sets else sets
    goldens = []
    for folder in candidates:
        with open(os.path.join(GOLDEN_ROOT, folder, name)) as f:
            goldens.append(json.load(f))
    if fields_of_golden:
        assert any(recorded_fields(found, golden) == golden for golden in goldens), (
            f"{name}: its recorded fields equal none of {candidates} (recorded: {sets}; "
            f"this platform: {PLATFORM})"
        )
        return
    assert any(found == golden for golden in goldens), (
        f"{name} equals none of {candidates} (recorded: {sets}; this platform: {PLATFORM})"
    )


@pytest.fixture(scope="module")
def workdir(trained_tetrominoes, tmp_path_factory):
    """A private copy of the shared run (other tests write their own evaluations into it)."""
    _, shared = trained_tetrominoes
    copy = tmp_path_factory.mktemp("golden") / "run"
    shutil.copytree(shared, copy, ignore=shutil.ignore_patterns("eval", "tensorboard"))
    return str(copy)


def test_training_metrics_are_unchanged(workdir):
    _check("metrics.json", training_records(workdir))


def test_evaluation_metrics_are_unchanged(workdir):
    _check("eval_metrics.json", evaluation_record(workdir), fields_of_golden=True)


def test_recorded_fields_ignore_new_fields_only():
    golden = {"metrics": {"ari": 0.5, "usage": [1, 2]}, "figures": ["alpha", "tsne"]}
    grown = {
        "metrics": {"ari": 0.5, "usage": [1, 2], "new": 3},
        "figures": ["alpha", "new", "tsne"],
    }
    assert recorded_fields(grown, golden) == golden
    changed = {"metrics": {"ari": 0.25, "usage": [1, 2]}, "figures": ["alpha", "tsne"]}
    assert recorded_fields(changed, golden) != golden
    lost = {"metrics": {"usage": [1, 2], "new": 3}, "figures": ["alpha"]}
    assert recorded_fields(lost, golden) != golden
    assert (
        recorded_fields(
            {"metrics": {"ari": 0.5, "usage": [1, 3]}, "figures": ["alpha", "tsne"]}, golden
        )
        != golden
    )


# The ablations and options the shared run does not take: (name, dotted field -> value).
STEP_VARIANTS = (
    ("joint", {"train.alternate": False, "train.num_prototype_steps": 0}),
    ("kmeans_prototypes", {"train.prototype_objective": "kmeans"}),
    (
        "stale_descriptors_cosine",
        {
            "train.prototype_descriptors": "stale",
            "train.lr_schedule": "cosine",
            "train.warmup_steps": 1,
            "loss.sw_weight": 0.5,
        },
    ),
)


def _step_variant_metrics(overrides: dict) -> list[dict]:
    """Three train steps of tetrominoes:test with `overrides` on fixed random images."""
    import jax
    import numpy as np

    from configs import tetrominoes
    from tusk_jax import models
    from tusk_jax import state as state_lib
    from tusk_jax import step as step_lib

    config = tetrominoes.get_config("test")
    with config.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split(".")
            config[section][field] = value
    model = models.create_model(config)
    state = state_lib.replicate(state_lib.create_train_state(config, model))
    step = step_lib.make_p_train_step(config, model)
    devices = jax.local_device_count()
    size = config.dataset.image_size
    records = []
    for i in range(3):
        images = np.random.default_rng(i).uniform(
            size=(devices, config.train.batch_size // devices, size, size, 3)
        )
        state, metrics = step(state, images.astype(np.float32), None)
        records.append({k: float(v) for k, v in state_lib.unreplicate(metrics).items()})
    return records


@pytest.mark.parametrize("name,overrides", STEP_VARIANTS, ids=[v[0] for v in STEP_VARIANTS])
def test_train_step_variants_are_unchanged(name, overrides):
    _check(f"step_{name}.json", _step_variant_metrics(overrides))
