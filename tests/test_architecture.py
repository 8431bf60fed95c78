"""The package's house rules, checked: shared building blocks, contracts, layout."""

import pathlib
import re
import warnings

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
from tf_sparsity.budget import Budget, resolve_budget
from tf_sparsity.collapse import LayerCollapseError, LayerCollapseWarning, report_collapse
from tf_sparsity.protocols import ReportsSummary, Steerable, StrippableLayer
from tf_sparsity.report import LayerReport
from tf_sparsity.schedules import PolynomialRamp

PACKAGE = pathlib.Path(tfs.__file__).parent
PRIVATE = re.compile(r"keras\.src|tensorflow\.python|_inbound_nodes|_outbound_nodes|tf\.__internal__")


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_only_compat_reaches_private_apis():
    offenders = [str(p.relative_to(PACKAGE)) for p in _sources()
                 if p.name != "_compat.py" and PRIVATE.search(p.read_text())]
    assert offenders == []


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _sources() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_leaf_modules_import_nothing_from_the_package():
    for name in ("report.py", "protocols.py", "budget.py", "collapse.py"):
        assert "from tf_sparsity" not in (PACKAGE / name).read_text(), name


def test_summary_function_does_not_hide_a_module():
    assert callable(tfs.summary) and tfs.summarize.summary is tfs.summary


# ---------------------------------------------------------------- budget
def test_one_budget_everywhere_with_the_same_messages():
    assert resolve_budget(compression=4) == Budget(compression=4.0)
    assert Budget(sparsity=0.75).keep(100) == Budget(compression=4).keep(100) == 25
    for build in (lambda **kw: tfs.optimizers.GlobalSparseMomentum(0.01, **kw),
                  lambda **kw: tfs.callbacks.TargetSparsity(**kw),
                  lambda **kw: tfs.prune_at_init(tfs.zoo.mnist1d_cnn(), "magnitude", verbose=0, **kw)):
        with pytest.raises(ValueError, match=r"`sparsity` must be a number in \(0, 1\); received 1.5"):
            build(sparsity=1.5)
        with pytest.raises(ValueError, match="`compression` must be a number > 1"):
            build(compression=0.5)
        with pytest.raises(ValueError, match="exactly one of `compression` or `sparsity`"):
            build(compression=10, sparsity=0.9)


def test_old_budget_names_still_work_and_warn():
    with pytest.warns(DeprecationWarning, match="`target_sparsity` is deprecated"):
        opt = tfs.optimizers.GlobalSparseMomentum(0.01, target_sparsity=0.8)
    assert opt.sparsity == 0.8 and opt.get_config()["sparsity"] == 0.8
    with pytest.warns(DeprecationWarning, match="`target` is deprecated"):
        assert tfs.callbacks.TargetSparsity(target=0.9).target == pytest.approx(0.9)
    m = keras.Sequential([keras.Input((10,)), keras.layers.Dense(10)])
    with pytest.warns(DeprecationWarning):
        tfs.optimizers.final_prune(m, target_sparsity=0.75)
    assert tfs.summary(m, print_fn=None).nonzeros == 25


def test_target_sparsity_takes_compression_and_round_trips():
    cb = tfs.callbacks.TargetSparsity(compression=10, end_step=100)
    assert cb.target == pytest.approx(0.9)
    again = tfs.callbacks.TargetSparsity.from_config(cb.get_config())
    assert again.get_config() == cb.get_config()


# ---------------------------------------------------------------- ramp
def test_one_ramp_for_target_sparsity_and_gsm():
    ramp = PolynomialRamp(10, 110, power=3)
    assert ramp(0) == 0.0 and ramp(110) == 1.0 and ramp(60) == pytest.approx(0.875)
    assert float(ramp(keras.ops.convert_to_tensor(60))) == pytest.approx(0.875)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ramp))
    assert restored.get_config() == ramp.get_config()
    with pytest.raises(ValueError, match="`end_step`"):
        PolynomialRamp(10, 5)
    cb = tfs.callbacks.TargetSparsity(0.8, begin_step=10, end_step=110)
    cb._end = 110
    assert cb.current_target(60) == pytest.approx(0.8 * 0.875)


# ---------------------------------------------------------------- collapse
def test_one_collapse_policy():
    with pytest.warns(LayerCollapseWarning, match="gone"):
        report_collapse("gone", "warn")
    with pytest.raises(LayerCollapseError, match="gone"):
        report_collapse("gone", "raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_collapse("gone", "ignore")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.warns(LayerCollapseWarning):
        report_collapse("gone", "stop", model)
    assert model.stop_training
    assert tfs.callbacks.LayerCollapseError is LayerCollapseError
    with pytest.raises(ValueError, match=r"`on_collapse` must be one of \['warn', 'raise', 'ignore'\]"):
        tfs.prune_at_init(tfs.zoo.mnist1d_cnn(), "magnitude", compression=10, on_collapse="stop")


# ---------------------------------------------------------------- protocols
@keras.saving.register_keras_serializable(package="tf_sparsity_tests")
class _Halved(keras.layers.Dense):
    """A third-party layer that takes part in strip and summary through the protocols only."""

    def call(self, x):
        return super().call(x) * 0.5

    def stripped_layer(self):
        plain = keras.layers.Dense(self.units, name=self.name)
        plain.build((None, self.kernel.shape[0]))
        plain.set_weights([w * 0.5 for w in self.get_weights()])
        return plain

    def summary_row(self, timesteps=None, name=None):
        return LayerReport(name=name or self.name, type="Halved", params=1, prunable=0, nonzeros=0,
                           threshold=None, flops=None, effective_flops=None, bytes=0)


def test_strip_and_summary_dispatch_on_the_protocols():
    layer = _Halved(3, name="halved")
    assert isinstance(layer, StrippableLayer) and isinstance(layer, ReportsSummary)
    model = keras.Sequential([keras.Input((4,)), layer])
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    plain = tfs.strip(model)
    assert type(plain.layers[-1]) is keras.layers.Dense
    np.testing.assert_allclose(plain(x), model(x), atol=1e-6)
    assert tfs.summary(model, print_fn=None).layers[0].type == "Halved"


def test_target_sparsity_steers_every_steerable():
    sparse = tfs.soft_threshold(keras.Sequential([keras.Input((6, 2)), tfs.layers.LowRankGRU(4),
                                                  keras.layers.Dense(3, name="head")]))
    found = tfs.steering.steerables(sparse)
    assert all(isinstance(s, Steerable) for s in found)
    assert sorted(s.steering_name for s in found) == ["head", "input_matrix", "recurrent_matrix"]
