r"""Every benchmark figure in one command: train step, inference, input pipeline.

  python benchmarks/run_all.py                                  # all rows (several minutes)
  python benchmarks/run_all.py --json_out=/tmp/figures.json     # the same, also as JSON
  python benchmarks/run_all.py --only=inference,input --iterations=20
  python benchmarks/run_all.py --quick                          # smoke run on the :test configs

Run it from the repository root on a quiet machine. It prints the machine
(CPU model, cores, load average, jax version, devices), then one markdown
table row per measurement (`ROWS`):

- `train/...`: `benchmarks/train_step.py`'s `time_train_step` (TPS pairs +
  encoder/decoder Adam step + prototype steps, `tusk_jax.step.train_step`
  over all local devices, random images in memory) at the reference's MNIST
  setting (`configs/mnist_hard.py`, 4 pairs), its Tetrominoes setting
  (`configs/tetrominoes.py`, 2 pairs) and the `:cpu` variants at their own
  batch. First call = compile + first iteration; ms per iteration; pairs/s.
- `inference/...`: `tusk_jax.inference.Detector.detect` on batches of random
  images at the paper's sizes (Tetrominoes 112, MNIST-Hard 80), with random
  weights of the config's shapes (timing does not depend on the values, and no
  checkpoint or `model.init` compile is needed). First call = compile + first
  `detect` call; ms per call of `--inference_images` images; images/s.
- `input/...`: the training iterator (`tusk_jax.input_pipeline`, as
  `python benchmarks/input_throughput.py` times it) at the `:cpu` configs on
  `--input_num_train` generated scenes (not the configs' 50K, to keep the run
  short) in `--data_dir` or a temporary folder. First call = iterator
  creation (loading the split) + first batch; ms per batch; examples/s.

Each measurement runs in its own Python process (this file with `--measure`),
so its peak RSS (`ru_maxrss`, printed in MB) is its own and every compile is
cold: the persistent compilation cache is switched off in the measurement
processes unless `--compilation_cache` is given. `--quick` runs every row on
its dataset's `:test` config at that config's batch, with fewer iterations:
the same code paths in about two minutes (most of it process start-up and
tracing), for the test and a smoke run, not figures to quote.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
sys.path.insert(0, REPO)  # configs/
sys.path.insert(0, BENCHMARKS)  # train_step.py

KINDS = ("train", "inference", "input", "memory")
# Environment variables that make jax reuse compiled programs across processes.
CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR",)
# A 1-minute load average above this fraction of the usable cores at the start is reported.
BUSY_LOAD = 0.25
INPUT_NUM_TEST = 500  # Test scenes generated for the input rows (only `train` is timed).

_ONLY = flags.DEFINE_list(
    "only", list(KINDS), "Measurements to run: kinds (train, inference, input) or row names."
)
_QUICK = flags.DEFINE_bool("quick", False, "Every row on its dataset's :test config, few steps.")
_ITERATIONS = flags.DEFINE_integer(
    "iterations", None, "Timed train iterations / detect calls after the first (10; quick 2)."
)
_INPUT_BATCHES = flags.DEFINE_integer(
    "input_batches", None, "Timed training batches of the input rows (200; quick 20)."
)
_INPUT_NUM_TRAIN = flags.DEFINE_integer(
    "input_num_train", 5000, "Training scenes generated for the input rows (quick: the :test's)."
)
_INFERENCE_IMAGES = flags.DEFINE_integer(
    "inference_images", None, "Images per timed detect call (64; quick 8)."
)
_INFERENCE_BATCH = flags.DEFINE_integer(
    "inference_batch", None, "Detector batch_size: images per network call (16; quick 4)."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data dir for the input rows (default: a temporary folder, removed)."
)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures as JSON to this file.")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache",
    False,
    "Let the measurement processes use $JAX_COMPILATION_CACHE_DIR (first calls are then not "
    "cold compiles).",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Pass the measurement processes' logs through.")
# Internal: the parent runs this file with these to take one measurement.
_MEASURE = flags.DEFINE_string("measure", None, "(internal) Row name measured in this process.")
_RESULT_FILE = flags.DEFINE_string("result_file", None, "(internal) Where --measure writes.")


@dataclasses.dataclass(frozen=True)
class Row:
    """One measurement: what runs, on which config.

    Attributes:
      name: row name, `kind/dataset...`.
      kind: train | inference | input.
      dataset: `configs/<dataset>.py`.
      variant: config variant ('' for the paper's settings, 'cpu').
      batch_size: train rows: global pairs per iteration (None: the config's).
    """

    name: str
    kind: str
    dataset: str
    variant: str
    batch_size: int | None = None


ROWS = (
    Row("train/mnist_hard/reference", "train", "mnist_hard", "", batch_size=4),
    Row("train/tetrominoes/reference", "train", "tetrominoes", "", batch_size=2),
    Row("train/tetrominoes:cpu", "train", "tetrominoes", "cpu"),
    Row("train/mnist_hard:cpu", "train", "mnist_hard", "cpu"),
    Row("inference/tetrominoes", "inference", "tetrominoes", ""),
    Row("inference/mnist_hard", "inference", "mnist_hard", ""),
    Row("input/tetrominoes:cpu", "input", "tetrominoes", "cpu"),
    Row("input/mnist_hard:cpu", "input", "mnist_hard", "cpu"),
    Row("memory/paper_configs", "memory", "", ""),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}
UNITS = {"train": "pairs/s", "inference": "images/s", "input": "examples/s", "memory": "configs/s"}
FIRST_CALL = {
    "train": "compile + first iteration",
    "inference": "compile + first detect call",
    "input": "iterator creation (loads the split) + first batch",
    "memory": "lowering and compiling every config's step at two batches (not run)",
}
PER_CALL = {"train": "iteration", "inference": "detect call", "input": "batch", "memory": "config"}


def select_rows(only: list[str]) -> list[Row]:
    """The rows named by `--only` items (a kind or a row name), in `ROWS` order.

    Raises:
      ValueError: an item is neither a kind nor a row name (the message lists both).
    """
    chosen = set()
    for item in only:
        item = item.strip()
        if item in KINDS:
            chosen.update(row.name for row in ROWS if row.kind == item)
        elif item in ROWS_BY_NAME:
            chosen.add(item)
        else:
            raise ValueError(
                f"--only: unknown measurement {item!r}; valid: {', '.join(KINDS)} or a row name "
                f"({', '.join(ROWS_BY_NAME)})."
            )
    if not chosen:
        raise ValueError("--only selects no measurement.")
    return [row for row in ROWS if row.name in chosen]


def format_figure(value: float) -> str:
    """Three significant figures, no exponent above 1: 0.0123, 1.23, 123, 12345."""
    if abs(value) >= 999.5:
        return f"{value:.0f}"
    return f"{value:.3g}"


# ----------------------------------------------------------------------------
# The machine.
# ----------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict:
    """CPU model, cores, load average, OS, Python, jax / jaxlib versions, devices."""
    import jaxlib

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    devices = jax.devices()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ----------------------------------------------------------------------------
# The measurements (each in its own process).
# ----------------------------------------------------------------------------


def load_config(row: Row, quick: bool) -> ml_collections.ConfigDict:
    """An unlocked copy of the row's config (`:test` variant when `quick`)."""
    module = importlib.import_module(f"configs.{row.dataset}")
    config = module.get_config("test" if quick else row.variant or None)
    return config.copy_and_resolve_references()


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def measure_train(row: Row, quick: bool, iterations: int) -> dict:
    """`train_step.time_train_step` at the row's config and batch (quick: the config's batch)."""
    import train_step

    config = load_config(row, quick)
    result = train_step.time_train_step(
        config, None if quick else row.batch_size, iterations=iterations
    )
    return {
        "setting": result["setting"],
        "first_call_s": result["compile_seconds"],
        "ms_per_call": 1000 * result["seconds_per_iteration"],
        "throughput": result["pairs_per_second"],
    }


def random_weights(config: ml_collections.ConfigDict, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Flax variables and `[M, C]` prototypes of the config's shapes, N(0, 0.2^2) floats.

    The shapes come from `jax.eval_shape(model.init)`: no init compile, and no
    import of `tusk_jax.train` (seconds of start-up) in the inference process.
    """
    from tusk_jax import models

    model = models.create_model(config)
    size = int(config.dataset.image_size)
    abstract = jax.eval_shape(
        model.init, jax.random.PRNGKey(seed), jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    )
    rng = np.random.default_rng(seed)

    def fill(leaf):
        return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    prototypes = rng.standard_normal((config.model.num_prototypes, config.model.feature_dim))
    return jax.tree.map(fill, abstract), prototypes.astype(np.float32)


def measure_inference(
    row: Row, quick: bool, iterations: int, num_images: int, batch_size: int
) -> dict:
    """`Detector.detect` on `num_images` random `[S, S, 3]` images, S = the config's size."""
    from tusk_jax import inference

    config = load_config(row, quick)
    variables, prototypes = random_weights(config)
    detector = inference.Detector(config, variables, prototypes, batch_size=batch_size)
    size = int(config.dataset.image_size)
    rng = np.random.default_rng(0)
    batches = [rng.random((num_images, size, size, 3), dtype=np.float32) for _ in range(2)]
    start = time.perf_counter()
    found = detector.detect(batches[0])
    first = time.perf_counter() - start
    if len(found) != num_images:
        raise RuntimeError(f"detect returned {len(found)} results for {num_images} images.")
    start = time.perf_counter()
    for i in range(iterations):
        detector.detect(batches[i % 2])
    seconds = (time.perf_counter() - start) / iterations
    m = config.model
    setting = (
        f"{config.dataset.name}: {size}x{size} K={m.num_keypoints} M={m.num_prototypes} "
        f"window={m.window} width={m.base_width} images/call={num_images} "
        f"batch={batch_size} {jax.default_backend()}"
    )
    return {
        "setting": setting,
        "first_call_s": first,
        "ms_per_call": 1000 * seconds,
        "throughput": num_images / seconds,
    }


def measure_input(
    row: Row, quick: bool, num_batches: int, num_train: int, data_dir: str | None
) -> dict:
    """Training-iterator throughput on generated data (`benchmarks/input_throughput.py`'s way)."""
    from tusk_jax import datasets, input_pipeline

    config = load_config(row, quick)
    config_num_train = int(config.dataset.num_train)
    if data_dir:
        config.dataset.data_dir = data_dir
    if not quick:
        config.dataset.num_train = num_train
        config.dataset.num_test = min(int(config.dataset.num_test), INPUT_NUM_TEST)
    start = time.perf_counter()
    datasets.prepare_dataset(config)  # Generates the data when the folder lacks it.
    prepare_seconds = time.perf_counter() - start
    start = time.perf_counter()
    iterator = input_pipeline.create_train_iterator(config)
    try:
        first = next(iterator)
        first_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        seconds = (time.perf_counter() - start) / num_batches
    finally:
        iterator.close()
    per_batch = int(first.shape[0] * first.shape[1])
    size = int(config.dataset.image_size)
    setting = (
        f"{config.dataset.name}: {size}x{size} batch={per_batch} "
        f"num_train={config.dataset.num_train} source={config.dataset.source}"
    )
    return {
        "setting": setting,
        "first_call_s": first_seconds,
        "ms_per_call": 1000 * seconds,
        "throughput": per_batch / seconds,
        "prepare_s": prepare_seconds,
        "num_train": int(config.dataset.num_train),
        "config_num_train": config_num_train,
    }


def measure_memory(quick: bool) -> dict:
    """`benchmarks/memory.py`'s figures of every paper config (quick: two `:test` configs)."""
    import memory

    names = ("tetrominoes", "mnist_hard") if quick else memory.PAPER_CONFIGS
    start = time.perf_counter()
    configs = [memory.config_memory(name, "test" if quick else None) for name in names]
    seconds = time.perf_counter() - start
    return {
        "setting": "XLA memory_analysis of the training step, "
        + ("the :test configs" if quick else "every paper config"),
        "first_call_s": seconds,
        "ms_per_call": 1000 * seconds / len(configs),
        "throughput": len(configs) / seconds,
        "configs": configs,
    }


def measure(row: Row, settings: dict) -> dict:
    """Runs one row in this process; adds `peak_rss_mb` and the device count."""
    if row.kind == "train":
        result = measure_train(row, settings["quick"], settings["iterations"])
    elif row.kind == "memory":
        result = measure_memory(settings["quick"])
    elif row.kind == "inference":
        result = measure_inference(
            row,
            settings["quick"],
            settings["iterations"],
            settings["inference_images"],
            settings["inference_batch"],
        )
    else:
        result = measure_input(
            row,
            settings["quick"],
            settings["input_batches"],
            settings["input_num_train"],
            settings["data_dir"],
        )
    result["peak_rss_mb"] = peak_rss_mb()
    result["devices"] = jax.local_device_count()
    return result


# ----------------------------------------------------------------------------
# The parent: one process per row, the table.
# ----------------------------------------------------------------------------


def resolve_settings() -> dict:
    """The flags with their quick / full defaults filled in (passed to every measurement)."""
    quick = _QUICK.value

    def pick(value, full, small):
        return value if value is not None else (small if quick else full)

    settings = {
        "quick": quick,
        "iterations": pick(_ITERATIONS.value, 10, 2),
        "input_batches": pick(_INPUT_BATCHES.value, 200, 20),
        "input_num_train": _INPUT_NUM_TRAIN.value,
        "inference_images": pick(_INFERENCE_IMAGES.value, 64, 8),
        "inference_batch": pick(_INFERENCE_BATCH.value, 16, 4),
        "data_dir": _DATA_DIR.value,
    }
    for name in ("iterations", "input_batches", "input_num_train", "inference_images"):
        if settings[name] < 1:
            raise ValueError(f"--{name} must be >= 1, got {settings[name]}.")
    if settings["inference_batch"] < 1:
        raise ValueError(f"--inference_batch must be >= 1, got {settings['inference_batch']}.")
    return settings


def child_environment(compilation_cache: bool) -> dict:
    """The parent's environment, without the persistent compilation cache unless asked."""
    env = dict(os.environ)
    if not compilation_cache:
        for name in CACHE_VARIABLES:
            env.pop(name, None)
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def run_row(row: Row, settings: dict, env: dict, verbose: bool) -> dict:
    """Runs `--measure=row.name` in a new process; its result, or `{'error': ...}`."""
    with tempfile.TemporaryDirectory(prefix="tusk_bench_") as tmp:
        result_file = os.path.join(tmp, "result.json")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            f"--measure={row.name}",
            f"--result_file={result_file}",
            f"--quick={settings['quick']}",
            f"--iterations={settings['iterations']}",
            f"--input_batches={settings['input_batches']}",
            f"--input_num_train={settings['input_num_train']}",
            f"--inference_images={settings['inference_images']}",
            f"--inference_batch={settings['inference_batch']}",
        ]
        if settings["data_dir"]:
            command.append(f"--data_dir={settings['data_dir']}")
        output = None if verbose else subprocess.PIPE
        start = time.perf_counter()
        done = subprocess.run(
            command, env=env, cwd=REPO, stdout=output, stderr=output, text=True, check=False
        )
        process_seconds = time.perf_counter() - start
        if done.returncode == 0 and os.path.exists(result_file):
            with open(result_file) as f:
                result = json.load(f)
        else:
            tail = (done.stderr or "").strip().splitlines()[-20:]
            last = tail[-1] if tail else "(no output; --verbose shows the process's logs)"
            result = {
                "error": f"exit status {done.returncode}: {last[-500:]}",
                "stderr_tail": "\n".join(tail),
            }
    result["process_s"] = process_seconds  # The whole process: start-up, set-up, measurement.
    return {"name": row.name, "kind": row.kind, "throughput_unit": UNITS[row.kind], **result}


def table_lines(rows: list[dict]) -> list[str]:
    """The markdown table: one line per row, figures through `format_figure`."""
    lines = [
        "| measurement | setting | first call (s) | ms / call | throughput | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            error = row["error"].replace("|", "/")
            lines.append(f"| {row['name']} | FAILED: {error} | | | | |")
            continue
        lines.append(
            f"| {row['name']} | {row['setting']} | {format_figure(row['first_call_s'])} | "
            f"{format_figure(row['ms_per_call'])} | "
            f"{format_figure(row['throughput'])} {row['throughput_unit']} | "
            f"{format_figure(row['peak_rss_mb'])} |"
        )
    return lines


def memory_table_lines(rows: list[dict]) -> list[str]:
    """`benchmarks/memory.py`'s table of the memory row (with a blank line), or nothing."""
    import memory

    for row in rows:
        if row["kind"] == "memory" and "error" not in row:
            return [
                "Device memory of the training step (XLA's memory_analysis on this backend):",
                memory.markdown_table(row["configs"]),
                "",
            ]
    return []


def note_lines(
    rows: list[dict], settings: dict, compilation_cache: bool, machine: dict
) -> list[str]:
    """What the columns mean for each kind, and how the run differs from the configs."""
    kinds = [kind for kind in KINDS if any(row["kind"] == kind for row in rows)]
    notes = [
        f"{kind}: first call = {FIRST_CALL[kind]}; ms per {PER_CALL[kind]}; {UNITS[kind]}."
        for kind in kinds
    ]
    load = machine["load_average"][0]
    if load > BUSY_LOAD * machine["usable_cores"]:
        notes.append(
            f"WARNING: load average {load:.2f} on {machine['usable_cores']} usable cores at the "
            "start: other work was running, so the figures are pessimistic."
        )
    notes.append(
        "Each row ran in its own process; peak RSS is that process's ru_maxrss; "
        + (
            "the persistent compilation cache was ON (first calls may be cache hits)."
            if compilation_cache
            else "compiles are cold (persistent compilation cache off)."
        )
    )
    if settings["quick"]:
        notes.append(
            "--quick: every row ran its dataset's :test config at that config's batch "
            f"({settings['iterations']} iterations): a smoke run, not figures to quote."
        )
    for row in rows:
        if row["kind"] == "input" and "error" not in row:
            notes.append(
                f"{row['name']}: {row['num_train']} training scenes (the config has "
                f"{row['config_num_train']}), prepared in {row['prepare_s']:.1f} s (generation; "
                "about 0 when the data dir already held them)."
            )
    notes.append(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    return notes


def run_all() -> int:
    """The parent: machine, one process per selected row, the table, the JSON. Exit status."""
    settings = resolve_settings()
    rows = select_rows(_ONLY.value)
    machine = machine_info()
    compilation_cache = _COMPILATION_CACHE.value
    env = child_environment(compilation_cache)
    temporary_data = None
    if settings["data_dir"] is None and any(row.kind == "input" for row in rows):
        temporary_data = tempfile.mkdtemp(prefix="tusk_bench_data_")
        settings["data_dir"] = temporary_data
    results = []
    try:
        for row in rows:
            print(f"running {row.name} ...", file=sys.stderr, flush=True)
            results.append(run_row(row, settings, env, _VERBOSE.value))
            if "error" in results[-1]:
                print(f"{row.name} failed:\n{results[-1]['stderr_tail']}", file=sys.stderr)
    finally:
        if temporary_data:
            shutil.rmtree(temporary_data, ignore_errors=True)
            settings["data_dir"] = None
    header = [
        f"tusk_jax benchmarks, {machine['date']}"
        + (" (--quick: smoke run on the :test configs)" if settings["quick"] else ""),
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"load average {' '.join(f'{x:.2f}' for x in machine['load_average'])} at the start, "
        f"{machine['os']}",
        f"jax {machine['jax']} (jaxlib {machine['jaxlib']}), Python {machine['python']}, "
        f"backend {machine['backend']}, {len(machine['devices'])} device(s): "
        f"{', '.join(machine['devices'])}",
    ]
    notes = note_lines(results, settings, compilation_cache, machine)
    memory_tables = memory_table_lines(results)
    print("\n".join(header + [""] + table_lines(results) + [""] + memory_tables + notes))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "settings": settings,
                    "compilation_cache": compilation_cache,
                    "rows": results,
                    "notes": notes,
                },
                f,
                indent=2,
            )
    failed = [row["name"] for row in results if "error" in row]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _MEASURE.value is None:
        sys.exit(run_all())
    if _MEASURE.value not in ROWS_BY_NAME:
        raise ValueError(f"--measure: unknown row {_MEASURE.value!r}; valid: {list(ROWS_BY_NAME)}")
    if not _RESULT_FILE.value:
        raise ValueError("--measure needs --result_file.")
    result = measure(ROWS_BY_NAME[_MEASURE.value], resolve_settings())
    with open(_RESULT_FILE.value, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    app.run(main)
