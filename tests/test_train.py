"""The training step and loop: learning, determinism, devices, resume, NaN, preemption.

Most tests feed a synthetic in-memory iterator (coloured squares) through the
real loop, so they test training and not the datasets; the end-to-end run on
the real pipeline lives in tests/test_main.py,
tests/test_multiprocess.py and the shared run of tests/conftest.py.
"""

import functools
import os
import signal

import jax
import numpy as np
import pytest

from configs import tetrominoes
from tests.synthetic import IMAGE_SIZE, squares
from tusk_jax import checkpointing, models, summaries, train
from tusk_jax import state as state_lib
from tusk_jax import step as step_lib


class FakeTrainIterator:
    """Deterministic batches `[local_devices, per_device, H, W, 3]` with a saveable position."""

    def __init__(self, config, poison_step=None, on_step=None):
        self.config = config
        self.position = 0
        self.poison_step = poison_step
        self.on_step = on_step

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        if self.on_step is not None:
            self.on_step(self.position)
        devices = jax.local_device_count()
        batch = squares(self.position, self.config.train.batch_size)
        if self.position == self.poison_step:
            batch[:] = np.nan
        return batch.reshape(devices, -1, *batch.shape[1:])

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]

    def close(self):
        pass


def make_config(**train_overrides):
    config = tetrominoes.get_config("test")
    with config.unlocked():
        for name, value in train_overrides.items():
            config.train[name] = value
    return config


@pytest.fixture
def fake_data(monkeypatch):
    """Replaces the input pipeline by `FakeTrainIterator`; returns a setter for its options."""
    options = {}
    monkeypatch.setattr(
        train.input_pipeline,
        "create_train_iterator",
        lambda config: FakeTrainIterator(config, **options),
    )
    return options


@functools.cache
def compiled_step(device_count):
    """The :test config's step, pmapped over the first `device_count` devices, and a trace count."""
    config = make_config()
    model = models.create_model(config)
    step_config = step_lib.StepConfig.from_config(config, model)
    traces = []

    def counted(state, images, vgg):
        traces.append(1)
        return step_lib.train_step(state, images, vgg, cfg=step_config)

    step = jax.pmap(counted, axis_name=step_lib.AXIS, devices=jax.devices()[:device_count])
    return config, model, step, traces


def run_steps(device_count, num_steps, seed=0):
    config, model, step, _ = compiled_step(device_count)
    state = state_lib.replicate(
        state_lib.create_train_state(config, model), devices=jax.devices()[:device_count]
    )
    history = []
    for i in range(num_steps):
        images = squares(seed + i, config.train.batch_size)
        state, metrics = step(state, images.reshape(device_count, -1, *images.shape[1:]), None)
        history.append(state_lib.unreplicate(metrics))
    return jax.device_get(state_lib.unreplicate(state)), history


def test_steps_lower_reconstruction_and_move_prototypes():
    config, model, step, traces = compiled_step(2)
    initial = state_lib.create_train_state(config, model)
    state = state_lib.replicate(initial)
    images = squares(0, config.train.batch_size).reshape(2, -1, IMAGE_SIZE, IMAGE_SIZE, 3)
    recon = []
    for _ in range(12):  # one fixed batch: the loss must go down
        state, metrics = step(state, images, None)
        recon.append(float(metrics["loss/recon"][0]))
    assert recon[-1] < 0.85 * recon[0]
    final = state_lib.unreplicate(state)
    assert int(final.step) == 12
    assert np.abs(final.prototypes - initial.prototypes).max() > 1e-2
    metrics = state_lib.unreplicate(metrics)
    for name in ("loss/recon", "loss/kmeans", "loss/eqv_score", "loss/eqv_feature", "loss/sw"):
        assert np.isfinite(metrics[name]) and metrics[name] >= 0, name
    assert 1 <= metrics["prototypes_in_use"] <= config.model.num_prototypes
    assert 0.0 <= metrics["confidence"] <= 1.0
    assert metrics["grad_norm"] > 0


def test_step_compiles_once():
    _, _, step, traces = compiled_step(2)
    run_steps(2, 3)
    before = len(traces)
    run_steps(2, 3, seed=5)
    assert len(traces) == before <= 1


def test_two_devices_equal_one_device():
    two, history_two = run_steps(2, 1)
    one, history_one = run_steps(1, 1)
    # Float sums run in another order on 1 and 2 devices, so compare within
    # float tolerance, after one step: a later step can flip a near-tie in the
    # nearest-prototype assignment (a discontinuity of the method, not a
    # device-dependence) and legitimately change L_sw and the prototypes.
    for name in history_two[0]:
        np.testing.assert_allclose(history_two[0][name], history_one[0][name], rtol=1e-4, atol=1e-6)
    # The prototypes fit descriptors that carry the same float noise through 8
    # Adam steps (each up to +-prototype lr): a few entries move by ~3e-4. A
    # device-dependent prototype update would move them by the lr's order.
    prototype_lr = compiled_step(1)[0].train.prototype_learning_rate
    np.testing.assert_allclose(two.prototypes, one.prototypes, rtol=0, atol=0.01 * prototype_lr)
    # Parameters: Adam's first update is +-lr whatever the gradient's size, so
    # an entry whose gradient is float noise lands on either side with the
    # summation order. The biases of the convs before a GroupNorm have a zero
    # gradient in exact arithmetic wherever a group holds one channel (the
    # group mean removes them): they are left out. All but a handful of the
    # other ~60k entries must agree; a gradient not averaged across devices
    # moves many.
    config, model, _, _ = compiled_step(1)
    lr = config.train.learning_rate

    def flat(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return np.concatenate(
            [
                np.ravel(x)
                for path, x in leaves
                if not (path[-1].key == "bias" and path[-2].key.startswith(("conv", "head_conv")))
            ]
        )

    differ = np.abs(flat(two.params) - flat(one.params))
    assert differ.max() <= 2.01 * lr
    assert np.mean(differ > 0.1 * lr) < 1e-3, int(np.sum(differ > 0.1 * lr))


def test_resume_is_bitwise_identical(tmp_path, fake_data):
    straight = train.train_and_evaluate(make_config(num_steps=4), str(tmp_path / "a"))
    train.train_and_evaluate(make_config(num_steps=2), str(tmp_path / "b"))
    resumed = train.train_and_evaluate(make_config(num_steps=4), str(tmp_path / "b"))
    assert int(resumed.step) == int(straight.step) == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    records = summaries.read_metrics(str(tmp_path / "b"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {r["learning_rate"] for r in records} == {make_config().train.learning_rate}
    assert os.path.exists(tmp_path / "b" / "config.json")
    assert tensorboard_image_tags(tmp_path / "a") == {
        "alpha",
        "detections",
        "prototypes",
        "reconstructions",
        "tsne",
    }


def tensorboard_image_tags(workdir):
    """Tags of the image summaries in a run's TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    from tusk_jax.datasets import tfrecord

    tags = set()
    for path in (workdir / "tensorboard").iterdir():
        for _, record in tfrecord.read_records(path):
            event = event_pb2.Event.FromString(record)
            tags |= {v.tag for v in event.summary.value if v.HasField("image")}
    return tags


def test_checkpoint_from_two_devices_restores_on_one(tmp_path, fake_data):
    saved = train.train_and_evaluate(make_config(num_steps=2), str(tmp_path))
    config, model, step, _ = compiled_step(1)
    template = jax.device_get(state_lib.create_train_state(config, model))
    restored, data_state, restored_step = checkpointing.restore(
        checkpointing.create_manager(str(tmp_path)), template
    )
    assert restored_step == 2 and data_state == {"position": 2}
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    state = state_lib.replicate(restored, devices=jax.devices()[:1])
    images = squares(9, config.train.batch_size)[None]
    state, metrics = step(state, images, None)
    assert int(state.step[0]) == 3 and np.isfinite(float(metrics["loss/total"][0]))


def test_nan_stops_with_step_and_term(tmp_path, fake_data):
    fake_data["poison_step"] = 3
    with pytest.raises(train.NonFiniteError, match=r"step 3: loss/\w+ = nan"):
        train.train_and_evaluate(make_config(num_steps=4, checkpoint_every=1), str(tmp_path))
    # The checkpoints before the bad step are intact.
    assert checkpointing.create_manager(str(tmp_path)).latest_step() == 2


def test_sigterm_saves_and_stops(tmp_path, fake_data):
    def preempt(position):
        if position == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    fake_data["on_step"] = preempt
    # Batches read in the loop's thread: with prefetching, the hook would fire
    # while an earlier step runs (the read-ahead), at a step that depends on timing.
    config = make_config(num_steps=4, prefetch_to_device=0)
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    assert checkpointing.create_manager(str(tmp_path)).latest_step() == 2
    # Running again resumes from step 2 and finishes.
    fake_data.pop("on_step")
    assert int(train.train_and_evaluate(make_config(num_steps=4), str(tmp_path)).step) == 4


def test_kmeans_ablation_pulls_prototypes_onto_descriptors():
    """prototype_objective='kmeans': the prototype steps minimise L_km, not L_sw."""
    config = make_config(prototype_objective="kmeans", num_prototype_steps=8)
    model = models.create_model(config)
    state = state_lib.create_train_state(config, model)
    images = squares(0, config.train.batch_size).reshape(2, -1, IMAGE_SIZE, IMAGE_SIZE, 3)
    new_state, metrics = step_lib.make_p_train_step(config, model)(
        state_lib.replicate(state), images, None
    )
    assert "loss/sw" not in metrics
    assert np.all(np.isfinite(np.asarray(metrics["loss/kmeans"])))
    # L_km of the prototypes fell over the 8 steps (weighted, see prototype_loss_*).
    assert float(metrics["prototype_loss_last"][0]) < float(metrics["prototype_loss_first"][0])
    assert np.abs(np.asarray(new_state.prototypes[0]) - state.prototypes).max() > 0


def test_cosine_learning_rate_schedule():
    schedule = state_lib.learning_rate_schedule(3e-3, "cosine", warmup_steps=10, num_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 1.5e-3, rtol=1e-6)  # Linear warm-up.
    np.testing.assert_allclose(float(schedule(10)), 3e-3, rtol=1e-6)  # Peak.
    np.testing.assert_allclose(float(schedule(60)), 1.5e-3, rtol=1e-5)  # Half-way down.
    assert float(schedule(110)) == 0.0
    decay = [float(schedule(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay[:-1], decay[1:], strict=True))
    assert state_lib.learning_rate_schedule(3e-3, "constant", 0, 110) == 3e-3


def test_cosine_optimizer_stops_moving_at_num_steps():
    """With lr_schedule='cosine' the encoder/decoder Adam counts its own updates to 0 lr."""
    config = make_config(lr_schedule="cosine", warmup_steps=1)  # :test: num_steps 4.
    tx, _ = state_lib.make_optimizers(config, device_count=1)
    params = {"w": np.ones(3, np.float32)}
    opt_state = tx.init(params)
    grads = {"w": np.ones(3, np.float32)}
    sizes = []
    for _ in range(config.train.num_steps + 1):
        updates, opt_state = tx.update(grads, opt_state, params)
        sizes.append(float(np.abs(updates["w"]).max()))
    assert sizes[0] == 0.0  # Warm-up starts at 0.
    assert sizes[1] == pytest.approx(config.train.learning_rate, rel=1e-3)  # Adam step = lr.
    assert 0 < sizes[3] < sizes[2] < sizes[1]
    assert sizes[4] == 0.0  # Update number num_steps + 1: the schedule has ended.


def test_joint_ablation_step_runs():
    config = make_config(alternate=False, num_prototype_steps=0)
    model = models.create_model(config)
    state = state_lib.replicate(state_lib.create_train_state(config, model))
    step = step_lib.make_p_train_step(config, model)
    images = squares(0, config.train.batch_size).reshape(2, -1, IMAGE_SIZE, IMAGE_SIZE, 3)
    before = np.asarray(state.prototypes[0])
    state, metrics = step(state, images, None)
    assert np.isfinite(float(metrics["loss/sw"][0]))
    assert np.abs(np.asarray(state.prototypes[0]) - before).max() > 0


def test_cadence_of_periodic_work():
    log = [s for s in range(1, 11) if train.every(s, 4, 10, at_last=True)]
    checkpoints = [s for s in range(1, 11) if train.every(s, 5, 10, at_last=False)]
    assert log == [4, 8, 10] and checkpoints == [5]
