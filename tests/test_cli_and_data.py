"""The user's path: datasets, the CLI, the demo and the examples."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_sparsity as tfs
from tf_sparsity import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mnist1d_shapes_split_and_determinism(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_SPARSITY_CACHE", str(tmp_path))
    (x, y), (xt, yt) = tfs.datasets.mnist1d(num_samples=1000, seed=3)
    assert x.shape == (800, 40, 1) and xt.shape == (200, 40, 1) and x.dtype == np.float32
    assert set(np.unique(y)) == set(range(10))
    assert list(tmp_path.glob("*.npz"))  # cached
    (x2, _), _ = tfs.datasets.mnist1d(num_samples=1000, seed=3, cache=False)
    np.testing.assert_array_equal(x, x2)
    (x3, _), _ = tfs.datasets.mnist1d(num_samples=1000, seed=4, cache=False)
    assert not np.array_equal(x, x3)
    with pytest.raises(ValueError, match="`num_samples`"):
        tfs.datasets.mnist1d(num_samples=0)


def test_digits():
    (x, y), (xt, yt) = tfs.datasets.digits()
    assert x.shape[1:] == (8, 8, 1) and len(x) + len(xt) == 1797
    assert 0 <= x.min() and x.max() <= 1


@pytest.mark.slow
def test_demo_quick_writes_report(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--output", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    methods = [r["method"] for r in results]
    assert methods == ["dense", "str-shared", "str-block1x4", "str-learned", "gsm", "synflow", "greedy", "lowrank-gru"]
    for r in results:
        if r["target"] is not None and r["method"] != "lowrank-gru":  # its target counts factor weights
            assert abs(r["sparsity"] - r["target"]) <= 0.01, r["method"]
            assert r["effective_flops"] < r["flops"]
        # Every method ran on LiteRT and TFLite Micro and got an EdgeTPU verdict.
        assert r["litert_us"] > 0 and r["tflm_arena_bytes"] > 0 and isinstance(r["edgetpu_ok"], bool)
        assert r["edgetpu_ok"] or r["method"] == "lowrank-gru"
    by = {r["method"]: r for r in results}
    assert by["greedy"]["flops"] < by["dense"]["flops"] and by["greedy"]["tflm_bytes"] < by["dense"]["tflm_bytes"]
    assert by["str-block1x4"]["litert_bytes"] < by["dense"]["litert_bytes"]  # 1x4 blocks stored sparse
    assert list(tmp_path.glob("*_tflm_int8.tflite"))
    assert "rank" in by["lowrank-gru"]["rank"]
    for name in ("report.md", "layer_sparsity.png", "accuracy_vs_sparsity.png", "str_dynamics.png",
                 "learned_ranks.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| str-shared |" in (tmp_path / "report.md").read_text()


def test_summary_command(tmp_path, capsys):
    model = tfs.soft_threshold(keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="d")]))
    path = tmp_path / "m.keras"
    model.save(path)
    assert cli.main(["summary", str(path)]) == 0
    assert "Sparsity summary" in capsys.readouterr().out
    assert cli.main(["summary", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["name"] == "d"
    assert cli.main(["summary", str(tmp_path / "missing.keras")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_help_and_bad_flags():
    run = subprocess.run([sys.executable, "-m", "tf_sparsity.cli", "demo", "--help"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "--quick" in run.stdout
    assert cli.main(["demo", "--epochs", "0"]) == 2


@pytest.mark.parametrize("script, expected", [
    ("synflow_mnist1d.py", "at sparsity 0.99"),
    ("gsm_mnist1d.py", "at sparsity 0.9"),
    ("greedy_to_microcontroller.py", "TFLM arena bytes"),
])
@pytest.mark.slow
def test_examples_quick(script, expected, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick",
                          *(["--output", str(tmp_path)] if "greedy" in script else [])],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert expected in run.stdout
    if "greedy" in script:
        assert (tmp_path / "greedy_int8.tflite").stat().st_size > 0
        assert list(tmp_path.glob("greedy_int8*.cc")) and list(tmp_path.glob("greedy_int8*.h"))


@pytest.mark.slow
def test_example_str_quick(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "str_mnist1d.py"), "--quick", "--target", "0.8",
         "--output", str(tmp_path / "plain.keras")],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "at sparsity 0.8" in run.stdout
    loaded = keras.models.load_model(tmp_path / "plain.keras")
    assert abs(tfs.sparsity(loaded) - 0.8) <= 0.01


@pytest.fixture()
def cli_files(tmp_path, mnist1d_data):
    (x, y), (xt, yt) = mnist1d_data
    np.savez(tmp_path / "data.npz", x=x[:512], y=y[:512], x_test=xt[:256], y_test=yt[:256])
    tfs.zoo.mnist1d_cnn(filters=8, hidden=32).save(tmp_path / "model.keras")
    return tmp_path


@pytest.mark.parametrize("method, extra", [("str", ["--sparsity", "0.8"]),
                                           ("str", ["--sparsity", "0.8", "--learn-threshold", "--keep-wrappers"]),
                                           ("synflow", ["--sparsity", "0.9"]),
                                           ("gsm", ["--sparsity", "0.9"]),
                                           ("greedy", ["--flops", "0.5", "--finetune-steps", "5"])])
@pytest.mark.slow
def test_prune_command(method, extra, cli_files, capsys):
    out = cli_files / f"{method}{len(extra)}.keras"
    code = cli.main(["prune", str(cli_files / "model.keras"), "--method", method, "--data",
                     str(cli_files / "data.npz"), "-o", str(out), "--epochs", "1", "--from-logits", "--quiet",
                     *extra])
    assert code == 0, capsys.readouterr().err
    pruned = keras.models.load_model(out)
    report = tfs.summary(pruned, print_fn=None)
    if method == "greedy":
        assert report.flops < tfs.summary(keras.models.load_model(cli_files / "model.keras"), print_fn=None).flops
    else:
        target = 0.8 if method == "str" else 0.9  # gsm: final_prune keeps exactly the top 10%
        assert abs(report.sparsity - target) <= 0.01
    if "--keep-wrappers" in extra:  # the paper's learned per-layer thresholds, kept trainable
        assert all(w.learn_threshold for w in tfs.surgery.wrappers(pruned))
    else:
        assert not tfs.surgery.wrappers(pruned)  # stripped


def test_prune_command_errors(cli_files, capsys):
    base = ["prune", str(cli_files / "model.keras"), "-o", str(cli_files / "o.keras")]
    assert cli.main(base + ["--method", "str", "--data", str(cli_files / "nope.npz")]) == 2
    assert "--data file not found" in capsys.readouterr().err
    np.savez(cli_files / "bad.npz", a=np.zeros(3))
    assert cli.main(base + ["--method", "str", "--data", str(cli_files / "bad.npz")]) == 2
    assert "lacks array(s) ['x', 'y']" in capsys.readouterr().err
    assert cli.main(base + ["--method", "str", "--data", str(cli_files / "data.npz"), "--sparsity", "2"]) == 2
    assert "--sparsity must be in (0, 1)" in capsys.readouterr().err
