"""TUSK on CLEVR6 (object discovery, alpha decoder), evaluated on CLEVR10 too.

  python -m tusk_jax.main --config=configs/clevr6.py --workdir=runs/clevr6
  python -m tusk_jax.evaluate --workdir=runs/clevr6 --dataset=clevr10 --num_keypoints=10

Needs DeepMind's `clevr_with_masks` TFRecords in the manual dir (no embedded
generator). CLEVR10 uses the model trained on CLEVR6 with 10 keypoints at
inference (the paper's Table 8).
"""

from configs import base


def get_config(variant: str | None = None):
    config = base.get_base_config()
    config.dataset.name = "clevr6"
    config.dataset.source = "real"
    config.dataset.image_size = 112  # Centre crop 192, resize 112 (SPEC 5).
    config.model.num_keypoints = 6
    config.model.num_prototypes = 48
    config.model.window = 21
    config.model.decoder_mode = "alpha"
    config.train.batch_size = 32  # 64 network images.
    return base.finalize(
        config,
        variant,
        cpu=base.cpu_overrides(**{"dataset.image_size": 56, "model.window": 11}),
        test=base.test_overrides(**{"model.num_keypoints": 6}),
    )
