"""Channel-STR's group floor (`min_channels`) on keras.applications nets steered by `TargetFlops`.

    python benchmarks/channel_floor.py                                     # EfficientNetB0, MobileNetV2
    python benchmarks/channel_floor.py --nets EfficientNetB0 --flops 0.5 0.3 --floors 0 1

For each net (`weights=None`, `--size` square inputs, 10 classes, no softmax,
BatchNormalization parameters and statistics drawn in [0.5, ~2] so that the
untrained net's output depends on its input) and each floor: `tfs.soft_threshold(granularity="channel",
learn_threshold=False, shrink=False, weight_decay=5e-4, min_channels=F)`,
one SGD epoch (lr 0.01, momentum 0.9, batch 16) on `--samples`
standard-normal images with random labels and `TargetFlops(flops)` (ramp
to the last step, an update every 2 steps), then `tfs.strip`. Reported:
the stripped model's MACs / dense, the channel groups emptied during the
run (`TargetFlops.emptied_groups`), how much the stripped model's output
still depends on its input (the std over 32 fresh inputs of each logit,
averaged, over the same for the dense model, both with BN statistics
recalibrated on the run's data; 0 = no signal reaches the
classifier), the largest difference between the stripped and the
thresholded model relative to the largest output, and the time of the fit.
"""

import time
import warnings

from common import RESULTS, parser, write_results  # noqa: F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402


def run_one(net, size, flops, floor, samples, seed):
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, net)(weights=None, input_shape=(size, size, 3), classes=10,
                                             classifier_activation=None)
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # untrained nets with unit BN carry almost no signal (outputs ~1e-9)
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([(rng.normal(size=w.shape) ** 2 * 0.5 + 0.5).astype("float32")
                               for w in layer.get_weights()])
    probe = rng.normal(size=(32, size, size, 3)).astype("float32")
    x = rng.normal(size=(samples, size, size, 3)).astype("float32")
    tfs.recalibrate_batchnorm(model, x, batch_size=16)  # the dense reference gets the same BN treatment
    dense_std = float(np.asarray(model(probe, training=False)).std(axis=0).mean())
    y = rng.integers(0, 10, samples)
    sparse = tfs.soft_threshold(model, granularity="channel", learn_threshold=False, shrink=False,
                                weight_decay=5e-4, min_channels=floor)
    sparse.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = int(np.ceil(samples / 16))
    steer = tfs.callbacks.TargetFlops(flops, end_step=steps - 1, update_every=2)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        sparse.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[steer])
    # BN statistics of the run's data (as after any real fine-tune); the probe stays unseen
    tfs.recalibrate_batchnorm(sparse, x, batch_size=16)
    seconds = time.perf_counter() - start
    small = tfs.strip(sparse)
    out = np.asarray(small(probe, training=False))
    dense = tfs.summary(model, print_fn=None).flops
    return {"net": net, "size": size, "flops asked": flops, "min_channels": floor,
            "macs": tfs.summary(small, print_fn=None).flops / dense,
            "emptied groups": steer.emptied_groups,
            "output std over inputs / dense": float(out.std(axis=0).mean()) / dense_std,
            "max |strip - thresholded| / max |output|":
                float(np.abs(out - np.asarray(sparse(probe, training=False))).max() / np.abs(out).max()),
            "fit seconds": seconds}


def main():
    p = parser(__doc__)
    p.add_argument("--nets", nargs="+", default=["EfficientNetB0", "MobileNetV2"])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--flops", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--floors", type=int, nargs="+", default=[0, 1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="channel_floor.json", help="results file name in benchmarks/results")
    a = p.parse_args()
    rows = []
    print("| net | MACs asked | min_channels | MACs reached | groups emptied | output std over inputs / dense | "
          "max abs(strip - thresholded) / max abs(output) | fit (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for net in a.nets:
        for flops in a.flops:
            for floor in a.floors:
                r = run_one(net, a.size, flops, floor, a.samples, a.seed)
                rows.append(r)
                print(f"| {net} | {flops:g} | {floor} | {r['macs']:.3f} | {len(r['emptied groups'])} | "
                      f"{r['output std over inputs / dense']:.3g} | {r['max |strip - thresholded| / max |output|']:.1e} | {r['fit seconds']:.0f} |", flush=True)
    write_results(RESULTS / a.out, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
