"""The config file given to `--config`: flag parsing whose failures are one line.

ml_collections loads `--config=FILE[:variant]` while absl parses the flags.
A file that is missing, a folder, has a syntax error, or whose `get_config`
raises, would show a traceback of the flag libraries (or, for a missing
file, only when the config is first read). `parse_flags` reports each as one
line naming the file (and line) and what to do; so does an override of a
config field that does not exist. Imports no JAX (main parses its flags
before the runtime starts).
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import flags

# Where every config field is documented (named by the unknown-field message).
FIELDS_DOC = "tusk_jax/configs/base.py"
EXAMPLE = "configs/tetrominoes.py:test"


def config_argument(argv: list[str], name: str = "config") -> str | None:
    """The value given to `--<name>` in `argv` (`--config=X` or `--config X`), else None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _where(error: BaseException, path: str) -> str:
    """` (line N)` of the deepest frame of `error` inside `path`, else ''."""
    target = os.path.abspath(path)
    if isinstance(error, SyntaxError) and error.lineno:
        if error.filename and os.path.abspath(error.filename) != target:
            return f" ({error.filename}, line {error.lineno})"
        return f" (line {error.lineno})"
    line = ""
    for frame in traceback.extract_tb(error.__traceback__):
        if os.path.abspath(frame.filename) == target:
            line = f" (line {frame.lineno})"
    return line


def load_error(error: BaseException, spec: str) -> str:
    """One line for a config file `spec` (`FILE[:variant]`) that could not give a config."""
    path = spec.split(":", 1)[0]
    if not os.path.exists(path):
        return (
            f"config file {path} not found (cwd {os.getcwd()}); give the path of a config "
            f"file, e.g. --config={EXAMPLE}."
        )
    if os.path.isdir(path):
        return f"config file {path} is a folder; give a .py config file, e.g. --config={EXAMPLE}."
    cause = error
    while isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__  # ml_collections' "earlier failure to load" wrapper.
    if isinstance(cause, SyntaxError):
        message = f"{type(cause).__name__}: {cause.msg}"
    elif isinstance(cause, OSError) and cause.strerror:
        message = cause.strerror
    else:
        message = f"{type(cause).__name__}: {cause}".splitlines()[-1]
    return f"config file {spec} failed{_where(cause, path)}: {message}; fix the file."


def _wrapped_message(error: flags.Error) -> str | None:
    """The exception line of an error ml_collections re-raised as flag text, else None."""
    text = str(error)
    if "Error whilst parsing config file" not in text:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    tail = [line for line in lines if not line.startswith(" ")]
    return tail[-1].strip() if tail else lines[-1].strip()


def unknown_field(error: Exception, argv: list[str]) -> str:
    """A one-line message for an override of a config field that does not exist."""
    name = str(error).strip("\"'")
    for arg in argv:
        if arg.startswith("--config.") and name in arg.split("=")[0].split("."):
            field = arg.split("=")[0][len("--config.") :]
            return (
                f"unknown config field {field} (in {arg}); the fields are documented in "
                f"{FIELDS_DOC}."
            )
    return f"unknown config field {name!r}; the fields are documented in {FIELDS_DOC}."


def parse_flags(
    prog: str, argv: list[str], flag_values: flags.FlagValues = flags.FLAGS
) -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=...)`; every failure one line.

    Also reads the config once, so a config file that failed to load is
    reported here rather than at its first use.

    Exits:
      `sys.exit("<prog>: ...")` (status 1) for an unknown flag, a config file
      that is missing, a folder, or fails to run, and an unknown config field.
    """
    spec = config_argument(argv)
    try:
        remaining = flag_values(argv)
        if spec is not None and "config" in flag_values:
            config = flag_values.config
            if config is not None:
                config.get("train")  # An unloadable file raises here (ml_collections).
        return remaining
    except flags.Error as error:
        wrapped = _wrapped_message(error)
        if wrapped is not None and spec is not None:
            sys.exit(f"{prog}: config file {spec} failed: {wrapped}")
        sys.exit(f"{prog}: {error} (--helpshort lists the flags)")
    except (AttributeError, KeyError) as error:  # ml_collections: no such field
        if spec is not None and _raised_in(error, spec):
            sys.exit(f"{prog}: {load_error(error, spec)}")
        sys.exit(f"{prog}: {unknown_field(error, argv)}")
    except Exception as error:  # The user's config file raised it (else re-raised).
        from_file = isinstance(error, OSError | SyntaxError) or _raised_in(error, spec or "")
        if spec is None or not from_file:
            raise
        sys.exit(f"{prog}: {load_error(error, spec)}")


def _raised_in(error: BaseException, spec: str) -> bool:
    """True when a frame of `error`'s traceback is in the config file of `spec`."""
    target = os.path.abspath(spec.split(":", 1)[0])
    return any(
        os.path.abspath(frame.filename) == target
        for frame in traceback.extract_tb(error.__traceback__)
    )
