"""TUSK on CelebA in the wild (landmarks, perceptual loss): the paper's Table 10.

  python -m tusk_jax.main --config=configs/celeba.py \
      --config.loss.vgg16_weights=/path/vgg16.npz --workdir=runs/celeba

Needs the unaligned CelebA files in the manual dir and VGG16 weights converted
with `python -m tusk_jax.convert_vgg16` (the perceptual loss).
"""

from configs import base


def get_config(variant: str | None = None):
    config = base.get_base_config()
    config.dataset.name = "celeba_wild"
    config.dataset.source = "real"
    config.dataset.image_size = 80
    config.model.num_keypoints = 4
    config.model.num_prototypes = 32
    config.model.window = 21
    config.model.decoder_mode = "plain"
    config.loss.recon = "perceptual"
    config.loss.eqv_score_weight = 0.05
    config.loss.eqv_feature_weight = 500.0
    config.train.batch_size = 16  # 32 network images.
    config.tps.scale, config.tps.scale_var = 0.9, 0.05
    config.tps.tps, config.tps.off, config.tps.rot = 0.05, 0.05, 0.25
    return base.finalize(
        config,
        variant,
        cpu=base.cpu_overrides(**{"dataset.image_size": 48, "model.window": 13}),
        # The test variant checks the pipeline with MSE (no VGG16 file here).
        test=base.test_overrides(**{"loss.recon": "mse", "model.num_prototypes": 6}),
    )
