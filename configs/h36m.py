"""TUSK on Human3.6M (landmarks, 16 keypoints): the paper's Table 10.

  python -m tusk_jax.main --config=configs/h36m.py --workdir=runs/h36m

Needs the background-removed Human3.6M frames in the manual dir (layout in
tusk_jax/datasets/README.md).
"""

from configs import base


def get_config(variant: str | None = None):
    config = base.get_base_config()
    config.dataset.name = "h36m"
    config.dataset.source = "real"
    config.dataset.image_size = 112
    config.model.num_keypoints = 16
    config.model.num_prototypes = 32
    config.model.window = 11
    config.model.decoder_mode = "plain"
    config.train.batch_size = 16  # 32 network images.
    config.tps.scale, config.tps.scale_var = 0.95, 0.1
    config.tps.tps, config.tps.off, config.tps.rot = 0.05, 0.1, 0.25
    config.tps.padding, config.tps.cval = "constant", 1.0  # White background.
    return base.finalize(
        config,
        variant,
        cpu=base.cpu_overrides(**{"dataset.image_size": 56, "model.window": 7}),
        test=base.test_overrides(**{"model.num_keypoints": 8, "model.num_prototypes": 6}),
    )
