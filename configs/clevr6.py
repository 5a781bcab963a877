"""TUSK on CLEVR6 (object discovery, alpha decoder), evaluated on CLEVR10 too.

  python -m tusk_jax.main --config=configs/clevr6.py --workdir=runs/clevr6
  python -m tusk_jax.evaluate --workdir=runs/clevr6 --dataset=clevr10 --num_keypoints=10

The settings, each commented, are in `tusk_jax/configs/clevr6.py` (the
defaults in `tusk_jax/configs/base.py`); this file, the one given to
`--config`, re-exports them. Override fields on the command line
(`--config.train.batch_size=8`), or write a config of your own as those
files do: `base.get_base_config()`, your values, `base.finalize(...)`.
"""

from tusk_jax.configs.clevr6 import get_config

__all__ = ["get_config"]
