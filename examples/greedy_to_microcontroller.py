"""Greedy forward selection -> a smaller CNN -> int8 TFLite that runs on TFLite Micro.

    python examples/greedy_to_microcontroller.py --flops 0.4 --output out/
    python examples/greedy_to_microcontroller.py --quick --output out/
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import tf_sparsity as tfs  # noqa: E402
from tf_sparsity.experiments import train_classifier  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--flops", type=float, default=0.4)
    parser.add_argument("--output", default="greedy_out")
    parser.add_argument("--quick", action="store_true", help="3 epochs on 4000 samples, no fine-tune")
    args = parser.parse_args(argv)
    train, test = tfs.datasets.mnist1d(num_samples=4000 if args.quick else 10000)
    dense = tfs.zoo.mnist1d_cnn(weight_decay=5e-4)
    train_classifier(dense, train, test, epochs=3 if args.quick else 20)
    small = tfs.greedy_prune(dense, train[0][:1024], flops=args.flops, objective="local",
                             finetune_steps=0 if args.quick else 300)
    small.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    print(f"pruned accuracy {small.evaluate(*test, verbose=0)[1]:.4f}")
    tfs.summary(small)
    os.makedirs(args.output, exist_ok=True)
    result = tfs.export.convert(small, target="tflm", quantize="int8", representative_data=train[0][:200],
                                path=os.path.join(args.output, "greedy_int8.tflite"),
                                c_files=True)  # greedy_int8.cc / .h next to the .tflite
    print(result.report)
    print(f"TFLM arena bytes: {result.report.tflm['arena_bytes']}")


if __name__ == "__main__":
    main()
