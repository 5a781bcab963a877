"""TUSK on Human3.6M (landmarks, 16 keypoints): the paper's Table 10.

  python -m tusk_jax.main --config=configs/h36m.py --workdir=runs/h36m

The settings, each commented, are in `tusk_jax/configs/h36m.py` (the
defaults in `tusk_jax/configs/base.py`); this file, the one given to
`--config`, re-exports them. Override fields on the command line
(`--config.train.batch_size=8`), or write a config of your own as those
files do: `base.get_base_config()`, your values, `base.finalize(...)`.
"""

from tusk_jax.configs.h36m import get_config

__all__ = ["get_config"]
