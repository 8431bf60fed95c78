"""Train-step time of channel-STR over channel groups: unit factors once per pass vs per wrapper.

    python benchmarks/channel_str_step.py                       # the zoo nets and MobileNetV2 at 32x32
    python benchmarks/channel_str_step.py --nets MobileNetV2 --size 96 --batch 32

`tfs.soft_threshold(net, granularity="channel")` (channel groups, hard mask,
`learn_threshold=False`, coupled L2 5e-4), compiled with SGD. "once per
pass": the `ChannelGroupModel` itself (its `call` computes every unit's
RMS and factor once, `ChannelCoupling.one_pass`). "per wrapper" (the
computation before): `keras.Model(model.inputs, model.outputs)` over the
same layers, where each wrapper computes the factors of the units it
touches. Both run `train_on_batch` on the same random batch; rounds
alternate between the two, and each round's median step time is taken
after warm-up; the table gives the median over rounds and the ratio.
"""

import time

from common import HERE, parser, run_and_report, write_results  # noqa: E402,F401  (first: quiet TensorFlow)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_sparsity as tfs  # noqa: E402


def build(name, size):
    if name.startswith("mnist1d"):
        return getattr(tfs.zoo, name)(), (40, 1)
    net = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10,
                                            classifier_activation=None)
    return net, (size, size, 3)


def compiled(model):
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def step_times(model, x, y, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(a):
    rows = []
    for name in a.nets:
        keras.utils.set_random_seed(0)
        net, shape = build(name, a.size)
        sparse = tfs.soft_threshold(net, granularity="channel", weight_decay=5e-4, learn_threshold=False,
                                    shrink=False, s_init=-4.0)
        variants = {"once per pass": compiled(sparse),
                    "per wrapper": compiled(keras.Model(sparse.inputs, sparse.outputs))}
        rng = np.random.default_rng(0)
        x = rng.standard_normal((a.batch, *shape)).astype("float32")
        y = rng.integers(0, 10, a.batch)
        medians = {k: [] for k in variants}
        for model in variants.values():  # trace and warm up
            step_times(model, x, y, 3)
        for _ in range(a.rounds):
            for key, model in variants.items():
                medians[key].append(step_times(model, x, y, a.steps))
        row = {"net": name, "input": list(shape), "batch": a.batch, "units": sparse.channel_coupling.num_units,
               "wrappers": len(sparse.channel_coupling.ids),
               **{f"{k} (ms)": 1e3 * float(np.median(v)) for k, v in medians.items()},
               "rounds": {k: v for k, v in medians.items()}}
        row["speed-up"] = row["per wrapper (ms)"] / row["once per pass (ms)"]
        rows.append(row)
        print({k: v for k, v in row.items() if k != "rounds"}, flush=True)
    return rows


def table(rows):
    lines = ["| net | input | batch | coupled wrappers | units | per wrapper (ms / step) | once per pass (ms / step) | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {'×'.join(map(str, r['input']))} | {r['batch']} | {r['wrappers']} | {r['units']} | "
                     f"{r['per wrapper (ms)']:.1f} | {r['once per pass (ms)']:.1f} | {r['speed-up']:.2f}× |")
    return lines


def main():
    p = parser(__doc__)
    p.add_argument("--nets", nargs="+", default=["mnist1d_resnet", "mnist1d_mobilenet", "MobileNetV2"])
    p.add_argument("--size", type=int, default=32, help="keras.applications input size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="channel_str_step.json", help="results file name in benchmarks/results")
    run_and_report(p.parse_args(), run, table)


if __name__ == "__main__":
    main()
