"""The `tf-sparsity` command: demo, prune, summary, export."""

import argparse
import os
import sys

PRUNE_METHODS = ("str", "gsm", "synflow", "snip", "grasp", "magnitude", "random", "greedy", "l1", "lowrank")


def _parser():
    parser = argparse.ArgumentParser(prog="tf-sparsity", description="Sparse training for Keras 3.")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up log (CUDA stub, oneDNN, absl lines)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="every method on MNIST-1D; writes report.md, results.json, PNGs")
    demo.add_argument("--output", "-o", default="demo_out", help="folder for report.md, results.json, PNGs")
    demo.add_argument("--quick", action="store_true", help="a smoke run (about 2-3 minutes on 2 cores)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20, quick 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress output")

    prune = sub.add_parser("prune", help="prune (and train where the method needs it) a .keras model")
    prune.add_argument("model", help="input .keras model (built Sequential or functional)")
    prune.add_argument("--method", required=True, choices=PRUNE_METHODS,
                       help="str: soft-threshold pruning with one shared threshold steered to the target (trains; '--learn-threshold' for the paper's learned per-layer thresholds); gsm: global sparse momentum (trains); "
                            "synflow/snip/grasp/magnitude/random: prune at init, then train; "
                            "greedy / l1: remove channels (optional imitation fine-tune); "
                            "lowrank: GRU/LSTM layers become low-rank STR layers steered to rank "
                            "(1 - sparsity) x max rank (trains with Adam)")
    prune.add_argument("--data", required=True,
                       help=".npz with arrays x and y (optionally x_test, y_test for the final accuracy)")
    prune.add_argument("--output", "-o", required=True, help="output .keras path")
    budget = prune.add_mutually_exclusive_group()
    budget.add_argument("--sparsity", type=float, default=None,
                        help="fraction of prunable weights to remove (str, gsm, at-init methods); default 0.9")
    budget.add_argument("--compression", type=float, default=None,
                        help="or keep 1/C of the prunable weights (C > 1), as in the papers' tables")
    prune.add_argument("--flops", type=float, default=0.5,
                       help="fraction of dense MACs to keep (greedy, l1); default 0.5")
    prune.add_argument("--epochs", type=int, default=10, help="training epochs (0 = no training)")
    prune.add_argument("--batch-size", type=int, default=128)
    prune.add_argument("--learning-rate", type=float, default=None,
                       help="default 0.1 (SGD-Nesterov 0.9), 0.02 for gsm (momentum 0.99, coupled L2 5e-3)")
    prune.add_argument("--loss", default="sparse_categorical_crossentropy", help="a Keras loss name")
    prune.add_argument("--from-logits", action="store_true", help="the model outputs logits")
    prune.add_argument("--finetune-steps", type=int, default=300, help="greedy / l1 imitation fine-tune steps")
    prune.add_argument("--granularity", default="weight", choices=("weight", "block", "channel"),
                       help="STR group: single weights, 1x4 blocks (fast float FC on LiteRT), channels")
    prune.add_argument("--learn-threshold", action="store_true",
                       help="str: the paper's learned per-layer thresholds (the decay on s is steered to the "
                            "target) instead of one shared threshold")
    prune.add_argument("--keep-wrappers", action="store_true",
                       help="save the trainable wrapped model instead of the stripped plain one")
    prune.add_argument("--quiet", action="store_true")

    summ = sub.add_parser("summary", help="per-layer table of a .keras model or a .tflite file")
    summ.add_argument("model", help="path to a .keras or .tflite file")
    summ.add_argument("--json", action="store_true", help="print the data as JSON")

    export = sub.add_parser("export", help="convert a .keras model to .tflite for a target, verified on its runtime")
    export.add_argument("model", help="input .keras model")
    export.add_argument("--target", required=True, choices=("litert", "edgetpu", "tflm"))
    export.add_argument("--int8", action="store_true", help="full integer quantization (needs --data)")
    export.add_argument("--quantize", choices=("dynamic", "float16", "int8"), default=None)
    export.add_argument("--data", help=".npz with array x: representative data for int8 calibration")
    export.add_argument("--output", "-o", required=True, help="output folder")
    export.add_argument("--sparse", choices=("auto", "on", "off"), default="auto",
                        help="sparse weight encoding (litert only); auto picks what speeds up")
    return parser


def _load_npz(path, need_y=True):
    import numpy as np

    if not os.path.exists(path):
        raise ValueError(f"--data file not found: {path}")
    try:
        data = np.load(path)
    except Exception as error:  # not an npz
        raise ValueError(f"--data must be an .npz file with arrays x and y: {error}") from None
    missing = [k for k in (("x", "y") if need_y else ("x",)) if k not in data]
    if missing:
        raise ValueError(f"--data {path} lacks array(s) {missing}; found {list(data.keys())}")
    return {k: data[k] for k in data.keys()}


def _load_model(path):
    import keras

    import tf_sparsity  # noqa: F401  (registers the layers)

    if not os.path.exists(path):
        raise ValueError(f"model file not found: {path}")
    if not path.endswith(".keras"):
        raise ValueError(f"expected a .keras file, got {path}")
    return keras.models.load_model(path)


def _prune(args):
    import keras
    import numpy as np

    import tf_sparsity as tfs
    from tf_sparsity.experiments import train_classifier

    from tf_sparsity.budget import resolve_budget

    if args.sparsity is None and args.compression is None:
        args.sparsity = 0.9
    if args.sparsity is not None and not 0 < args.sparsity < 1:
        raise ValueError("--sparsity must be in (0, 1)")
    if args.compression is not None and not args.compression > 1:
        raise ValueError("--compression must be > 1 (10 keeps 1/10 of the weights)")
    budget = resolve_budget(args.compression, args.sparsity)  # one check, the library's messages
    given = dict(compression=budget.compression, sparsity=budget.sparsity)
    if not 0 < args.flops < 1:
        raise ValueError("--flops must be in (0, 1)")
    if args.epochs < 0:
        raise ValueError("--epochs must be >= 0")
    model = _load_model(args.model)
    data = _load_npz(args.data)
    train = (data["x"], data["y"])
    test = (data.get("x_test", data["x"]), data.get("y_test", data["y"]))
    loss = keras.losses.get({"class_name": args.loss, "config": {"from_logits": args.from_logits}}
                            if args.from_logits else args.loss)
    verbose = 0 if args.quiet else 1
    callbacks, optimizer = [], None
    if args.method == "str":
        model = tfs.recipes.str_model(model, granularity=args.granularity, learn_threshold=args.learn_threshold)
        callbacks = [tfs.callbacks.TargetSparsity(**given), tfs.callbacks.SparsityMonitor()]
    elif args.method == "gsm":
        steps = args.epochs * int(np.ceil(len(train[0]) / args.batch_size))
        optimizer = tfs.recipes.gsm_optimizer(steps, **given,
                                              learning_rate=args.learning_rate or tfs.recipes.GSM["learning_rate"])
    elif args.method in ("greedy", "l1"):
        if args.method == "greedy":
            model = tfs.greedy_prune(model, train[0], flops=args.flops, finetune_steps=args.finetune_steps,
                                     verbose=verbose)
        else:
            model = tfs.pruning.l1_norm_prune(model, flops=args.flops, data=train[0],
                                              finetune_steps=args.finetune_steps)
        args.epochs = 0
    elif args.method == "lowrank":
        from tf_sparsity.pruning.low_rank import low_rank_rnns

        model = low_rank_rnns(model)
        steps = max(1, args.epochs * int(np.ceil(len(train[0]) / args.batch_size)))
        optimizer = tfs.recipes.low_rank_optimizer(steps, args.learning_rate or tfs.recipes.LOW_RANK_LEARNING_RATE)
        callbacks = [tfs.callbacks.TargetSparsity(**given, end_fraction=tfs.recipes.LOW_RANK_RAMP_END)]
    else:
        model = tfs.prune_at_init(model, args.method, **given, data=(train[0][:256], train[1][:256]),
                                  loss=loss, verbose=verbose)
    if args.epochs:
        result = train_classifier(model, train, test, epochs=args.epochs, batch_size=args.batch_size,
                                  learning_rate=args.learning_rate or tfs.recipes.SGD_LEARNING_RATE, callbacks=callbacks, optimizer=optimizer,
                                  verbose=verbose, loss=loss)
        print(f"test accuracy: {result['accuracy']:.4f}")
    if args.method == "gsm":
        from tf_sparsity.optimizers import final_prune

        final_prune(model, **given)
    if not args.keep_wrappers:
        model = tfs.strip(model)
    tfs.summary(model)
    model.save(args.output)
    print(f"wrote {args.output}")


def _summary(args):
    import json

    if args.model.endswith(".tflite"):
        from tf_sparsity import export

        if not os.path.exists(args.model):
            raise ValueError(f"file not found: {args.model}")
        report = export.inspect(args.model)
        print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report)
        return
    from tf_sparsity.summarize import summary

    report = summary(_load_model(args.model), print_fn=None)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report)


def _export(args):
    from tf_sparsity import export

    model = _load_model(args.model)
    quantize = "int8" if args.int8 else args.quantize
    data = _load_npz(args.data, need_y=False)["x"] if args.data else None
    if quantize == "int8" and data is None:
        raise ValueError("--int8 needs --data DATA.npz (representative inputs for calibration)")
    os.makedirs(args.output, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.model))[0]
    path = os.path.join(args.output, f"{name}_{args.target}.tflite")
    sparse = {"auto": "auto", "on": True, "off": False}[args.sparse]
    result = export.convert(model, target=args.target, quantize=quantize, representative_data=data,
                            sparse=sparse, path=path)
    print(result.report)
    print(f"wrote {result.path}")


def main(argv=None):
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is quiet already (tf_sparsity._startup)
    try:
        if args.command == "demo":
            from tf_sparsity.demo import run_demo

            if args.epochs is not None and args.epochs < 1:
                raise ValueError("--epochs must be >= 1")
            run_demo(args.output, quick=args.quick, epochs=args.epochs, seed=args.seed,
                     verbose=0 if args.quiet else 1)
        elif args.command == "prune":
            _prune(args)
        elif args.command == "summary":
            _summary(args)
        elif args.command == "export":
            _export(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"tf-sparsity {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
