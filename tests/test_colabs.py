"""The notebooks in colabs/ run top to bottom on the `:test` config (nbclient, this interpreter).

They are committed without outputs and executed here, so a notebook broken by a
library change fails CI. The quickstart trains its own 4-step Tetrominoes run;
the evaluation notebook runs on a copy of the session's shared trained run
(conftest's `trained_tetrominoes`). Beyond "no cell raised", each test checks
that the notebook did what it says: the requested steps were trained and
checkpointed, the figures were displayed, the metric table was printed, and
more keypoints than trained were found on the tiled image.
"""

import importlib
import os
import pathlib
import re
import shutil
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tusk_jax import inference, summaries

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
NOTEBOOKS = ("quickstart.ipynb", "evaluate_checkpoint.ipynb")


def execute(name: str, monkeypatch, **env: str):
    """Runs colabs/<name> in a fresh python3 kernel started from the repository root.

    Appends one cell printing the kernel's interpreter, to check it is this one
    (jupyter_client starts the `python3` kernel spec with `sys.executable`).
    Returns the executed notebook; a cell that raises fails the test.
    """
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    notebook = nbformat.read(COLABS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=900,  # per cell: a hang guard, not a timing assertion
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute()
    assert text_of(notebook.cells[-1]).strip() == sys.executable
    return notebook


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return "".join(parts)


def images_of(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def cell_with(notebook, code: str):
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and code in c.source]
    return cell


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_committed_without_outputs_and_link_to_colab(name):
    notebook = nbformat.read(COLABS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert "colab.research.google.com/github/" in notebook.cells[0].source
    assert f"/blob/main/colabs/{name}" in notebook.cells[0].source
    assert notebook.metadata.kernelspec.name == "python3"


def prose_of(notebook) -> str:
    """The notebook's words: its markdown, and its code comments joined into sentences."""
    parts = []
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source)
        elif cell.cell_type == "code":
            lines = cell.source.splitlines()
            parts.append(" ".join(line.split("#", 1)[1].strip() for line in lines if "#" in line))
    return "\n\n".join(parts)


# "<dataset>:<variant> ... N steps" within one sentence (no period between); a bare
# ":cpu" is the notebook's own config (its TUSK_CONFIG default).
STEP_CLAIM = re.compile(r"(?:\b([a-z0-9_]+))?:(cpu|test)\b`?[^.]*?\b(\d[\d,_]*)\s+steps\b")


def step_claims(text: str, default_dataset: str | None = None) -> list[tuple[str, str, int]]:
    """`(dataset, variant, steps)` of each sentence naming a config and a step count."""
    return [
        (m[1] or default_dataset, m[2], int(m[3].replace(",", "").replace("_", "")))
        for m in STEP_CLAIM.finditer(text)
    ]


def test_step_claim_parser_reads_sentences():
    text = "The tetrominoes:cpu config's full run is 2000 steps. Then 5 steps."
    assert step_claims(text) == [("tetrominoes", "cpu", 2000)]
    assert step_claims("`clevr6:cpu` trains 3,000 steps") == [("clevr6", "cpu", 3000)]
    assert step_claims("The `:cpu` run is 3000 steps", "mnist_hard") == [
        ("mnist_hard", "cpu", 3000)
    ]
    assert step_claims("tetrominoes:cpu takes an hour. It has 300 steps.") == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_step_counts_in_the_notebooks_equal_the_configs(name):
    """A number of steps a notebook quotes for a config is that config's train.num_steps."""
    notebook = nbformat.read(COLABS / name, as_version=4)
    own = re.search(r'"TUSK_CONFIG", "([a-z0-9_]+):', "".join(c.source for c in notebook.cells))
    claims = step_claims(prose_of(notebook), own and own[1])
    if name == "quickstart.ipynb":
        assert claims, "the quickstart quotes the :cpu run's steps; the parser found none"
    for dataset, variant, steps in claims:
        assert dataset, f"{name}: a step count for :{variant} without a config to check it against"
        config = importlib.import_module(f"configs.{dataset}").get_config(variant)
        assert steps == config.train.num_steps, (name, f"{dataset}:{variant}", steps)


def test_quickstart_default_steps_are_the_ones_quoted():
    """The quickstart's default NUM_STEPS is the count its comment and colabs/README.md quote."""
    source = cell_with(nbformat.read(COLABS / "quickstart.ipynb", as_version=4), "NUM_STEPS =")
    default = re.search(r'"TUSK_NUM_STEPS", "(\d+)"', source.source)[1]
    assert f"# {default} steps:" in source.source
    assert f"({default} steps," in (COLABS / "README.md").read_text()


@pytest.mark.slow
def test_quickstart_trains_and_shows_keypoints(trained_tetrominoes, tmp_path, monkeypatch):
    config, _ = trained_tetrominoes  # its prepared data, not its run
    workdir = tmp_path / "quickstart"
    notebook = execute(
        "quickstart.ipynb",
        monkeypatch,
        TUSK_CONFIG="tetrominoes:test",
        TUSK_NUM_STEPS="4",
        TUSK_WORKDIR=str(workdir),
        TUSK_DATA_DIR=config.dataset.data_dir,
    )
    assert [r["step"] for r in summaries.read_metrics(str(workdir))] == [1, 2, 3, 4]
    assert inference.load(str(workdir)).step == 4
    assert images_of(cell_with(notebook, "summaries.read_metrics")) == 1  # the loss curves
    detections = cell_with(notebook, "detector.detect(images)")
    assert images_of(detections) == 1 and "prototype = " in text_of(detections)
    assert images_of(cell_with(notebook, "detector.reconstruct")) == 1
    assert images_of(cell_with(notebook, "alpha_panel")) == 1


@pytest.mark.slow
def test_evaluate_notebook_shows_table_figures_and_more_keypoints(
    trained_tetrominoes, tmp_path, monkeypatch
):
    _, trained = trained_tetrominoes
    workdir = tmp_path / "run"  # a copy: the evaluation writes eval/ into its workdir
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("eval"))
    notebook = execute(
        "evaluate_checkpoint.ipynb",
        monkeypatch,
        TUSK_WORKDIR=str(workdir),
        TUSK_NUM_EXAMPLES="16",
        TUSK_USER_IMAGE="",
    )
    table = text_of(cell_with(notebook, "evaluate.format_table"))
    assert "tetrominoes / test, step 4, K = 3, 16 examples" in table
    assert "ARI-FG" in table and "99.70" in table  # ours beside the paper's
    assert os.path.exists(workdir / "eval" / "4" / "metrics.json")
    for figure in ("prototypes", "tsne", "detections"):
        assert images_of(cell_with(notebook, f'result["figures"]["{figure}"]')) == 1, figure
    user = cell_with(notebook, "num_keypoints = 4 * detector.num_keypoints")
    # Four 16 x 16 scenes tiled 2 x 2, searched for 4 x K = 12 keypoints.
    assert "12 keypoints (trained with K = 3) on a 32x32 image" in text_of(user)
    assert images_of(user) == 1
