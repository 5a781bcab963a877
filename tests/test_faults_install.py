"""tusk_jax installed without `-e`, run from a folder holding someone else's `configs/`.

The defaults (`tusk_jax/configs/base.py`) and the datasets' paper configs live
in the package: a tool finds them in an installed copy that has no repository
beside it, and never imports (executes) a `configs` folder of the working
directory, such as a downloaded run bundle's or another project's.

The installed copy is what setuptools puts in a wheel (`build_py` of the
package list in setup.cfg), built from a copy of the source, so nothing is
written into the repository.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRAP = """\
import os
open(os.path.join(os.path.dirname(__file__), "EXECUTED"), "w").close()
raise SystemExit("the working directory's configs/base.py was executed")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """A folder holding only the installed `tusk_jax` package (no configs/, no tests/)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source)
    shutil.copytree(
        os.path.join(REPO, "tusk_jax"),
        source / "tusk_jax",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    site = root / "site"
    subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q"]
        + ["build_py", "--build-lib", str(site)],
        cwd=source,
        check=True,
        capture_output=True,
    )
    assert (site / "tusk_jax" / "configs" / "base.py").is_file()
    assert not (site / "configs").exists()
    return str(site)


@pytest.fixture
def trap(tmp_path) -> str:
    """A working directory whose `configs` package writes EXECUTED when imported."""
    folder = tmp_path / "bundle"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "__init__.py").write_text(TRAP)
    (folder / "configs" / "base.py").write_text(TRAP)
    return str(folder)


def _run(args, installed, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=installed)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _workdir_lacking_a_field(trained, tmp_path) -> str:
    """A copy of the trained run whose config.json lacks `loss.kmeans_temperature`."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    path = workdir / "config.json"
    saved = json.loads(path.read_text())
    del saved["loss"]["kmeans_temperature"]
    path.write_text(json.dumps(saved))
    return str(workdir)


CHECK = """\
import sys
import tusk_jax
from tusk_jax import config_lib
from tusk_jax.datasets import prepare

assert tusk_jax.__file__.startswith(sys.argv[2]), tusk_jax.__file__
config = config_lib.load_config(sys.argv[1])
assert config.loss.kmeans_temperature == 20.0, config.loss
assert prepare.dataset_config("mnist_hard").dataset.image_size == 80
assert "configs" not in sys.modules, sys.modules["configs"]
print("ok")
"""


def test_installed_package_fills_defaults_without_the_working_directory(
    installed, trap, trained_tetrominoes, tmp_path
):
    workdir = _workdir_lacking_a_field(trained_tetrominoes[1], tmp_path)
    result = _run(["-c", CHECK, workdir, installed], installed, cwd=trap)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert not os.path.exists(os.path.join(trap, "configs", "EXECUTED"))


def test_installed_evaluate_in_a_bundle_folder_never_runs_its_configs(
    installed, trap, trained_tetrominoes, tmp_path
):
    workdir = _workdir_lacking_a_field(trained_tetrominoes[1], tmp_path)
    result = _run(
        ["-m", "tusk_jax.evaluate", f"--workdir={workdir}", "--tsne_points=0"], installed, cwd=trap
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not os.path.exists(os.path.join(trap, "configs", "EXECUTED"))
    step = max(os.listdir(os.path.join(workdir, "eval")), key=int)
    assert os.path.isfile(os.path.join(workdir, "eval", step, "metrics.json"))
