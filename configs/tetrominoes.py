"""TUSK on Tetrominoes (object discovery, alpha decoder): the authors' release.

  python -m tusk_jax.main --config=configs/tetrominoes.py --workdir=runs/tetrominoes
  python -m tusk_jax.main --config=configs/tetrominoes.py:cpu --workdir=runs/tetrominoes_cpu
  python -m tusk_jax.main --config=configs/tetrominoes.py:test --workdir=/tmp/tusk_test

The settings, each commented, are in `tusk_jax/configs/tetrominoes.py` (the
defaults in `tusk_jax/configs/base.py`); this file, the one given to
`--config`, re-exports them. Override fields on the command line
(`--config.train.batch_size=8`), or write a config of your own as those
files do: `base.get_base_config()`, your values, `base.finalize(...)`.
"""

from tusk_jax.configs.tetrominoes import get_config

__all__ = ["get_config"]
