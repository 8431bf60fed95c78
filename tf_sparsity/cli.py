"""The `tf-sparsity` command."""

import argparse
import os
import sys


def _parser():
    parser = argparse.ArgumentParser(prog="tf-sparsity", description="Sparse training for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train dense vs STR on MNIST-1D and write a report")
    demo.add_argument("--output", "-o", default="demo_out", help="folder for report.md, results.json, PNGs")
    demo.add_argument("--quick", action="store_true", help="a smoke run of under two minutes")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20, quick 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    summ = sub.add_parser("summary", help="per-layer sparsity table of a .keras model")
    summ.add_argument("model", help="path to a .keras file")
    summ.add_argument("--json", action="store_true", help="print the data as JSON")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if args.command == "demo":
            from tf_sparsity.demo import run_demo

            if args.epochs is not None and args.epochs < 1:
                raise ValueError("--epochs must be >= 1")
            run_demo(args.output, quick=args.quick, epochs=args.epochs, seed=args.seed,
                     verbose=0 if args.quiet else 1)
        elif args.command == "summary":
            import json

            import keras

            import tf_sparsity  # noqa: F401  (registers the layers for loading)
            from tf_sparsity.summary import summary

            if not os.path.exists(args.model):
                raise ValueError(f"model file not found: {args.model}")
            if not args.model.endswith(".keras"):
                raise ValueError(f"expected a .keras file, got {args.model}")
            report = summary(keras.models.load_model(args.model), print_fn=None)
            print(json.dumps(report.to_dict(), indent=1) if args.json else report)
    except (ValueError, TypeError, OSError) as error:
        print(f"tf-sparsity {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
