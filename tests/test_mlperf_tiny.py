"""The MLPerf Tiny reference networks of tfs.zoo: sizes, shapes and their dense int8 TFLM export."""

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
import tf_sparsity.export  # noqa: F401  (tfs.export)

# builder -> (parameters, input shape, output shape, regularized kernels at the default
# weight_decay, the reference int8 .tflite in mlcommons/tiny benchmark/training in bytes)
NETWORKS = {
    "mlperf_tiny_dscnn": (24_908, (49, 10, 1), (12,), 5, 53_936),  # kws_ref_model.tflite
    "mlperf_tiny_mobilenet": (221_794, (96, 96, 3), (2,), 14, 333_288),  # vww_96_int8.tflite
    "mlperf_tiny_resnet8": (78_666, (32, 32, 3), (10,), 9, 98_496),  # pretrainedResnet_quant.tflite
    "mlperf_tiny_autoencoder": (269_992, (640,), (640,), 0, 276_976),  # ad01_int8.tflite
}



def build(name, **kwargs):
    return getattr(tfs.zoo, name)(**kwargs)


@pytest.mark.parametrize("name", NETWORKS)
def test_parameter_counts_match_the_reference(name):
    assert build(name).count_params() == NETWORKS[name][0]


@pytest.mark.parametrize("name", NETWORKS)
def test_input_and_output_shapes(name):
    _, input_shape, output_shape, _, _ = NETWORKS[name]
    model = build(name)
    assert model.input_shape == (None, *input_shape)
    assert model.output_shape == (None, *output_shape)
    y = model(np.zeros((2, *input_shape), "float32"))
    assert tuple(y.shape) == (2, *output_shape)


@pytest.mark.parametrize("name", NETWORKS)
def test_weight_decay_sits_where_the_reference_puts_l2(name):
    regularized = NETWORKS[name][3]
    assert len(build(name).losses) == regularized
    assert len(build(name, weight_decay=0.0).losses) == 0
    if name == "mlperf_tiny_autoencoder":
        assert len(build(name, weight_decay=1e-4).losses) == 10


def test_classifiers_pool_their_last_feature_map_whole():
    # The reference files' AVERAGE_POOL_2D filters: KWS 25x5, VWW 3x3, IC 8x8.
    for name, pool in [("mlperf_tiny_dscnn", (25, 5)), ("mlperf_tiny_mobilenet", (3, 3)),
                       ("mlperf_tiny_resnet8", (8, 8))]:
        layer = build(name).get_layer("pool")
        assert tuple(layer.pool_size) == pool and tuple(layer.output.shape[1:3]) == (1, 1), name


def test_alpha_scales_the_mobilenet_widths():
    model = build("mlperf_tiny_mobilenet", alpha=0.5)
    assert model.get_layer("conv1").filters == 16 and model.get_layer("b13_pw").filters == 512


@pytest.mark.slow
@pytest.mark.parametrize("name", NETWORKS)
def test_dense_int8_tflm_export_runs_and_fits_the_reference_size(name, tmp_path):
    keras.utils.set_random_seed(0)
    model = build(name)
    x = np.random.default_rng(0).standard_normal((32, *model.input_shape[1:])).astype("float32")
    # Freshly initialized, the inference-mode BatchNorms (mean 0, variance 1) leave the
    # depthwise stacks' activations vanishing (MobileNet logits ~1e-13): the int8 SOFTMAX
    # input scale collapses and LiteRT's reference kernels abort the process. Statistics
    # from x give normalized activations and nonzero fused biases, as a trained model has.
    tfs.recalibrate_batchnorm(model, x, batch_size=len(x))
    path = tmp_path / f"{name}.tflite"
    # The reference AD file quantizes its FULLY_CONNECTED weights per tensor (one
    # scale per layer); per channel it would be 307,352 B, 1.11 x the reference.
    per_tensor = {"weight_quantization": "per_tensor"} if name == "mlperf_tiny_autoencoder" else {}
    result = tfs.export.convert(model, target="tflm", quantize="int8", representative_data=x, path=path,
                                **per_tensor)
    report = result.report
    assert report.verification["samples"] == 16 and report.tflm["samples"] == 16
    assert report.tflm["arena_bytes"] > 0
    assert path.read_bytes() == result.tflite
    assert len(result.tflite) <= 1.1 * NETWORKS[name][4]


def _data(model, n=16):
    x = np.random.default_rng(0).standard_normal((n, *model.input_shape[1:])).astype("float32")
    classes = model.output_shape[-1]
    y = x if model.output_shape[1:] == model.input_shape[1:] else np.arange(n) % classes
    loss = "mse" if y is x else keras.losses.SparseCategoricalCrossentropy()
    return x, y, loss


@pytest.mark.slow
@pytest.mark.parametrize("name", NETWORKS)
def test_every_method_runs_on_the_network(name):
    keras.utils.set_random_seed(0)
    dense = build(name)
    x, y, loss = _data(dense)
    # STR steered to 90 %, stripped to equal outputs.
    sparse = tfs.soft_threshold(dense, learn_threshold=False, shrink=False)
    sparse.compile(keras.optimizers.SGD(0.01), loss)
    sparse.fit(x, y, epochs=2, batch_size=8, verbose=0,
               callbacks=[tfs.callbacks.TargetSparsity(0.9, end_step=2, update_every=1)])
    assert tfs.sparsity(sparse) == pytest.approx(0.9, abs=0.01)
    np.testing.assert_allclose(tfs.strip(sparse).predict(x, verbose=0), sparse.predict(x, verbose=0), atol=1e-5)
    # GSM, SynFlow and the structured baselines.
    gsm = build(name)
    gsm.compile(tfs.optimizers.GlobalSparseMomentum(0.01, momentum=0.9, compression=10), loss)
    gsm.fit(x, y, epochs=1, batch_size=8, verbose=0)
    tfs.optimizers.final_prune(gsm)
    assert tfs.sparsity(gsm) == pytest.approx(0.9, abs=0.01)
    synflow = tfs.prune_at_init(dense, "synflow", compression=10, iterations=5, verbose=0)
    assert tfs.sparsity(synflow) == pytest.approx(0.9, abs=0.01)
    for small in (tfs.pruning.l1_norm_prune(dense, flops=0.5),
                  tfs.greedy_prune(dense, x, objective="reconstruction", flops=0.5, verbose=0)):
        ratio = tfs.summary(small, print_fn=None).flops / tfs.summary(dense, print_fn=None).flops
        assert 0.4 <= ratio <= 0.5
