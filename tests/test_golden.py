"""Golden numbers: a `configs/tetrominoes.py:test` run and its evaluation, bit for bit.

Refactors must not change a number. This test compares the `metrics.jsonl` of
conftest's `trained_tetrominoes` run (every logged value, wall-clock fields
left out) and the `eval/<step>/metrics.json` of `evaluate` on it (as the
`python -m tusk_jax.evaluate` command writes it; paths left out) with the
files under `tests/golden/`. Floats are compared exactly (JSON keeps every
bit of a Python float).

The files change only on request, when a change of numbers is intended
(explain it in the commit):

  TUSK_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

They hold what the two host CPU devices of `conftest.py` compute. XLA's CPU
code depends on the processor (an AMD EPYC without AVX-512 differed from the
machine of the first recording in the last bit of the first step, and four
steps amplified that to up to 3.4 % in a loss), so each platform has its own set:
`tests/golden/tetrominoes_test/<vendor>_<simd>/` (`platform_key`), written by
the update above. A run must equal its platform's set bit for bit. On a
platform without a set it must be close to one of the recorded sets
(`fallback_differences`): the first training step's numbers within
`FIRST_STEP_RTOL` (a last-bit difference, before any amplification: a changed
computation moves them far more); the later steps only the same fields and
types (an AMD EPYC with AVX-512 differed from the Intel set by 16 % in
`prototype_grad_norm` at step 4); the evaluation's numbers within
`FALLBACK_RTOL`, except the `DISCRETE_FIELDS` (counts, accuracies and
per-prototype tables over the 16 test scenes, which a last-bit difference can
flip), which only have to be there with the same type (that leaves the
reconstruction error and the mean confidence). Record the platform's own set
to check it bit for bit.
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
# A platform without its own set: numbers within this relative tolerance of
# a recorded set (two CPUs differ by up to 3.4 % after four steps, measured).
FALLBACK_RTOL = 0.1
# The first training step on another CPU: last-bit differences, grown a little by
# the sort of the sliced Wasserstein and the 8 prototype steps (an Intel and an
# AMD CPU, both AVX-512: up to 1.2e-4 relative, in `prototype_grad_norm`).
FIRST_STEP_RTOL = 1e-3
# Decisions over few scenes or descriptors (argmax, thresholds): a last-bit
# difference flips them (the two CPUs above: shape accuracy 1/3 vs 1/2 on 16
# scenes), so the fallback checks only their presence, type and length.
DISCRETE_FIELDS = (
    "ari",
    "ari_fg",
    "color_accuracy",
    "shape_accuracy",
    "matched_keypoint_fraction",
    "prototype_usage",
    "prototypes_in_use",
    "largest_prototype",
    "largest_prototype_share",
    "prototype_purity",
)
# Discrete lists whose length is itself a count (prototypes with matched keypoints).
VARIABLE_LENGTH_FIELDS = ("prototype_purity",)


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


def close_to_golden(found, golden, rtol: float = FALLBACK_RTOL, field: str = "") -> list[str]:
    """The differences of `found` from `golden` beyond the fallback's tolerance.

    Same structure and strings; numbers within `rtol` of the larger magnitude
    (ints that count steps or examples exactly); `DISCRETE_FIELDS` only the same
    type (and length for lists). Returns one line per difference, empty when close.
    """
    name = field.rsplit(".", 1)[-1]
    if name in DISCRETE_FIELDS:
        same = type(found) is type(golden) and (
            not isinstance(found, list)
            or name in VARIABLE_LENGTH_FIELDS
            or len(found) == len(golden)
        )
        return [] if same else [f"{field}: {found!r} vs {golden!r}"]
    if isinstance(golden, dict) and isinstance(found, dict):
        if set(found) != set(golden):
            return [f"{field}: keys {sorted(found)} vs {sorted(golden)}"]
        return [
            d
            for k in golden
            for d in close_to_golden(found[k], golden[k], rtol, f"{field}.{k}" if field else k)
        ]
    if isinstance(golden, list) and isinstance(found, list):
        if len(found) != len(golden):
            return [f"{field}: {len(found)} items vs {len(golden)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(found, golden, strict=True))
            for d in close_to_golden(a, b, rtol, f"{field}[{i}]")
        ]
    if isinstance(golden, float) and isinstance(found, float):
        if abs(found - golden) <= rtol * max(abs(found), abs(golden)):
            return []
    elif found == golden and type(found) is type(golden):
        return []
    return [f"{field}: {found!r} vs {golden!r}"]


def same_fields_and_types(found: dict, golden: dict, field: str) -> list[str]:
    if set(found) != set(golden):
        return [f"{field}: keys {sorted(found)} vs {sorted(golden)}"]
    return [
        f"{field}.{k}: {found[k]!r} vs {golden[k]!r}"
        for k in golden
        if type(found[k]) is not type(golden[k])
    ]


def fallback_differences(name: str, found, golden) -> list[str]:
    """`close_to_golden` for a platform without its own set (see the module docstring)."""
    if name != "metrics.json":
        return close_to_golden(found, golden)
    if len(found) != len(golden):
        return [f"{len(found)} training records vs {len(golden)}"]
    differences = close_to_golden(found[0], golden[0], FIRST_STEP_RTOL, "[0]")
    for i, (record, expected) in enumerate(zip(found[1:], golden[1:], strict=True), start=1):
        differences += same_fields_and_types(record, expected, f"[{i}]")
    return differences


def _check(name: str, found) -> None:
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
    # This platform's own set, bit for bit, when it has one.
    if PLATFORM in sets:
        with open(os.path.join(GOLDEN_ROOT, PLATFORM, name)) as f:
            assert found == json.load(f), f"{name} differs from the {PLATFORM} set"
        return
    # Otherwise close to any recorded set.
    differences = {}
    for folder in sets:
        with open(os.path.join(GOLDEN_ROOT, folder, name)) as f:
            differences[folder] = fallback_differences(name, found, json.load(f))
        if not differences[folder]:
            return
    pytest.fail(
        f"{name} is not close to any recorded set ({sets}; this platform, "
        f"{PLATFORM}, has none): "
        + "; ".join(f"{k}: {', '.join(v[:3])}" for k, v in differences.items())
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
    _check("eval_metrics.json", evaluation_record(workdir))


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


def test_fallback_tolerance():
    """Another CPU's numbers pass the fallback; a changed number or field does not."""
    golden = {"metrics": {"loss": 0.5, "ari": 0.33, "prototype_usage": [1, 2]}, "step": 4}
    other_cpu = {"metrics": {"loss": 0.517, "ari": 0.5, "prototype_usage": [2, 1]}, "step": 4}
    assert close_to_golden(other_cpu, golden) == []
    changed = {"metrics": {"loss": 0.6, "ari": 0.33, "prototype_usage": [1, 2]}, "step": 4}
    assert close_to_golden(changed, golden) == ["metrics.loss: 0.6 vs 0.5"]
    assert close_to_golden({**other_cpu, "step": 5}, golden) == ["step: 5 vs 4"]
    fewer = {"metrics": {"loss": 0.5, "ari": 0.33, "prototype_usage": [1]}, "step": 4}
    assert close_to_golden(fewer, golden)


def test_fallback_is_strict_on_the_first_step_and_structural_after():
    golden = [{"step": 1, "loss/total": 3.0, "n": 2.0}, {"step": 2, "loss/total": 1.0, "n": 2.0}]
    last_bit = [{"step": 1, "loss/total": 3.0 * (1 + 2e-4), "n": 2.0}, dict(golden[1])]
    assert fallback_differences("metrics.json", last_bit, golden) == []
    amplified = [dict(golden[0]), {"step": 2, "loss/total": 1.2, "n": 2.0}]
    assert fallback_differences("metrics.json", amplified, golden) == []
    changed = [{"step": 1, "loss/total": 3.01, "n": 2.0}, dict(golden[1])]
    assert fallback_differences("metrics.json", changed, golden) == ["[0].loss/total: 3.01 vs 3.0"]
    renamed = [dict(golden[0]), {"step": 2, "loss/sum": 1.0, "n": 2.0}]
    assert fallback_differences("metrics.json", renamed, golden)
    assert fallback_differences("metrics.json", golden[:1], golden)
    # Evaluation: per-prototype tables may change length; other numbers within 10 %.
    evaluation = {"metrics": {"prototype_purity": [{"prototype": 0}], "mean_confidence": 0.5}}
    fewer = {"metrics": {"prototype_purity": [], "mean_confidence": 0.52}}
    assert fallback_differences("eval_metrics.json", fewer, evaluation) == []
    drifted = {"metrics": {"prototype_purity": [], "mean_confidence": 0.6}}
    assert fallback_differences("eval_metrics.json", drifted, evaluation)
