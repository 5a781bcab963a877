"""The README's commands are true: every `python -m tusk_jax.<tool>` in its shell
blocks names a module that exists and only flags that module defines, every
config file it names exists, and its smoke run (the `:test` command) trains.
"""

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def shell_commands() -> list[str]:
    """The commands of the README's ```sh blocks (continuation lines joined, comments cut)."""
    with open(README) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("   #")[0].strip()
            for part in line.split("&&"):
                if part.strip():
                    commands.append(part.strip())
    return commands


def tool_commands() -> list[tuple[str, list[str]]]:
    """`(module, args)` of each `python -m tusk_jax.<module> ...` command."""
    found = []
    for command in shell_commands():
        words = shlex.split(command)
        if words[:2] == ["python", "-m"] and words[2].startswith("tusk_jax."):
            found.append((words[2], words[3:]))
    return found


@functools.cache
def defined_flags(module: str) -> frozenset[str]:
    """The flag names `python -m <module> --helpfull` lists."""
    shown = subprocess.run(
        [sys.executable, "-m", module, "--helpfull"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    return frozenset(re.findall(r"--\[?(?:no)?\]?([a-z_0-9]+)", shown.stdout + shown.stderr))


def test_the_readme_has_the_main_commands():
    modules = {module for module, _ in tool_commands()}
    for tool in ("main", "evaluate", "detect", "export", "learning_curve", "convert_release"):
        assert f"tusk_jax.{tool}" in modules, tool


@pytest.mark.slow
def test_every_readme_command_names_real_modules_flags_and_configs():
    for module, args in tool_commands():
        flags = defined_flags(module)
        assert flags, f"{module}: --helpfull listed no flags"
        for arg in args:
            if not arg.startswith("--"):
                continue
            name = arg[2:].split("=", 1)[0]
            if name.startswith("config."):  # A config field: checked by the config's own run.
                continue
            assert name in flags, f"README: {module} has no flag --{name} ({arg})"
            if name == "config" and "<" not in arg:  # Not a template like configs/<dataset>.py.
                path = arg.split("=", 1)[1].split(":")[0]
                assert os.path.exists(os.path.join(REPO, path)), f"README names {path}"


@pytest.mark.slow
def test_the_readme_smoke_run_trains(tmp_path):
    smoke = [
        args for module, args in tool_commands() if module == "tusk_jax.main" and any(
            a.startswith("--config=") and a.endswith(":test") for a in args
        )
    ]  # fmt: skip
    assert smoke, "the README shows no :test smoke run"
    args = [a if not a.startswith("--workdir=") else f"--workdir={tmp_path}/run" for a in smoke[0]]
    run = subprocess.run(
        [sys.executable, "-m", "tusk_jax.main", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO, TFDS_DATA_DIR=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")
