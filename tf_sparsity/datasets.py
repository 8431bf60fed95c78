"""Offline datasets: MNIST-1D (generated, never downloaded) and sklearn digits."""

import os
import pathlib

import numpy as np


def _cache_dir():
    root = os.environ.get("TF_SPARSITY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tf_sparsity"
    )
    return pathlib.Path(root)


def mnist1d(num_samples=5000, seed=42, train_split=0.8, cache=True):
    """MNIST-1D, generated offline with `mnist1d.make_dataset`.

    Returns `(x_train, y_train), (x_test, y_test)` with `x` of shape
    `(n, 40, 1)` float32 (channels last, for Conv1D/RNN) and integer labels
    0-9. The default is the published benchmark (5000 samples, 4000/1000
    split, seed 42); pass a larger `num_samples` for more data. Generated
    sets are cached under `~/.cache/tf_sparsity` (or `$TF_SPARSITY_CACHE`).

    Example:

    >>> (x, y), (x_test, y_test) = tfs.datasets.mnist1d()  # doctest: +SKIP
    >>> x.shape, x_test.shape  # doctest: +SKIP
    ((4000, 40, 1), (1000, 40, 1))
    """
    if not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"`num_samples` must be an integer >= 10; received {num_samples!r}.")
    if not 0 < train_split < 1:
        raise ValueError(f"`train_split` must be in (0, 1); received {train_split!r}.")
    path = _cache_dir() / f"mnist1d_n{num_samples}_s{seed}_t{train_split}.npz"
    if cache and path.exists():
        data = np.load(path)
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = seed
        args.train_split = train_split
        raw = make_dataset(args)
        data = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **data)
            os.replace(tmp, path)
    x = data["x"].astype("float32")[..., None]
    x_test = data["x_test"].astype("float32")[..., None]
    return (x, data["y"].astype("int64")), (x_test, data["y_test"].astype("int64"))


def digits(test_fraction=0.2, seed=0):
    """scikit-learn's bundled 8x8 digits: `(x_train, y_train), (x_test, y_test)`.

    `x` has shape `(n, 8, 8, 1)`, float32 in [0, 1].

    >>> (x, y), _ = tfs.datasets.digits()  # doctest: +SKIP
    >>> x.shape[1:]  # doctest: +SKIP
    (8, 8, 1)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype("float32")[..., None]
    y = bunch.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])
