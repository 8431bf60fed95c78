import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs so MirroredStrategy tests run with two real replicas. This
# must happen before TensorFlow initializes its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def mnist1d_data():
    import tf_sparsity as tfs

    return tfs.datasets.mnist1d()


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole session.

    Separate strategy objects in one process can hand out clashing collective
    instance keys (a shape-mismatch abort in CollectiveReduceV2), so every
    test shares this one.
    """
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
