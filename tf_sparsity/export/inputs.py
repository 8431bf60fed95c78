"""Stage 2 of `convert`: the model's input signature and the sample arrays.

Accepts what users have at hand as representative data (an array, `(x, y)`,
a list / dict for multi-input models, a `tf.data.Dataset`) and turns it into
per-input lists of arrays for calibration and verification.
"""

import numpy as np

__all__ = ["given_shapes", "input_specs", "random_samples", "samples"]


def input_specs(model, batch_size, input_shape, data, spec):
    """[{name, shape (batch first, static where possible), dtype}] per model input."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError("`model` has no known inputs (a subclassed model?); build it with keras.Input.")
    shapes = given_shapes(input_shape, len(inputs))
    first = _first_sample(data, [getattr(x, "name", None) or f"input_{i}" for i, x in enumerate(inputs)])
    specs = []
    for i, x in enumerate(inputs):
        shape = list(x.shape)
        name = getattr(x, "name", None) or f"input_{i}"
        if shapes is not None:
            given = list(shapes[i])
            if len(given) != len(shape) - 1 or any(s is not None and g != s for g, s in zip(given, shape[1:])):
                raise ValueError(f"`input_shape` {tuple(given)} does not fit model input '{name}' of shape "
                                 f"{tuple(shape[1:])} (batch dimension excluded).")
            shape[1:] = given
        elif first is not None and i < len(first) and first[i] is not None:
            # Align from the end: the data may or may not carry a batch axis.
            tail = list(first[i].shape[-(len(shape) - 1):]) if len(shape) > 1 else []
            if len(tail) == len(shape) - 1:
                shape[1:] = [s if s is not None else t for s, t in zip(shape[1:], tail)]
        shape[0] = batch_size
        if any(s is None for s in shape[1:]):
            if spec.static_shapes:
                raise ValueError(
                    f"model input '{name}' has unknown dimensions {tuple(x.shape)}; target '{spec.name}' "
                    "needs static shapes: pass input_shape=(...) without the batch dimension, e.g. the "
                    "sequence length.")
        specs.append({"name": name, "shape": shape, "dtype": str(getattr(x, "dtype", "float32"))})
    return specs


def given_shapes(input_shape, n):
    if input_shape is None:
        return None
    if n == 1 and all(isinstance(d, int) or d is None for d in input_shape):
        return [tuple(input_shape)]
    if len(input_shape) != n:
        raise ValueError(f"`input_shape` must give one shape per model input ({n}); received {input_shape!r}.")
    return [tuple(s) for s in input_shape]


def _by_name(mapping, names):
    """Dict of arrays -> list in model-input order (by name when the keys match)."""
    if set(mapping) >= set(names):
        return [mapping[name] for name in names]
    return list(mapping.values())[:len(names)]


def _x_part(element, n):
    """The model-input part of one dataset element / data tuple: drop labels."""
    if isinstance(element, dict):
        return element
    if isinstance(element, (list, tuple)):
        first = element[0]
        if isinstance(first, (tuple, dict)) or (isinstance(first, list) and first and hasattr(first[0], "shape")):
            # ((x1, x2), y) or ({...}, y)
            return element[0]
        return element[:1] if n == 1 else element[:n]  # (x, y) / (x1, x2)
    return [element]


def _as_arrays(data, names):
    """Representative data (not a Dataset) -> list of arrays (samples first), one per input."""
    n = len(names)
    if isinstance(data, (list, tuple, dict)):
        part = _x_part(data, n)
        return _by_name(part, names) if isinstance(part, dict) else [np.asarray(a) for a in part]
    if isinstance(data, np.ndarray) or hasattr(data, "numpy") or hasattr(data, "__array__"):
        return [np.asarray(data)]
    raise TypeError(f"`representative_data` must be an array, a list/dict of arrays or a tf.data.Dataset; "
                    f"received {type(data).__name__}.")


def _dataset_arrays(data, names, limit, rank=None):
    """Pull up to `limit` samples from a tf.data.Dataset (batched or not), labels dropped.

    `rank` is the first input's rank with the batch axis: elements of that
    rank are batches, lower-rank ones single samples.
    """
    n = len(names)
    collected = [[] for _ in range(n)]
    count = 0
    for element in data:
        part = _x_part(element, n)
        parts = _by_name(part, names) if isinstance(part, dict) else list(part)
        for i, p in enumerate(parts[:n]):
            collected[i].append(np.asarray(p))
        batched = rank is None or np.ndim(parts[0]) >= rank
        count += len(parts[0]) if batched and np.ndim(parts[0]) else 1
        if count >= limit:
            break
    return collected


def _first_sample(data, names):
    """The first array per input (any leading axes), for filling unknown dims."""
    if data is None:
        return None
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        return [a[0] if a else None for a in _dataset_arrays(data.take(1), names, 1)]
    return _as_arrays(data, names)


def samples(data, specs, limit):
    """Validated samples: list of [array per input] with the static batch shape."""
    if data is None:
        return []
    import tensorflow as tf

    n = len(specs)
    names = [s["name"] for s in specs]
    if isinstance(data, tf.data.Dataset):
        parts = _dataset_arrays(data, names, limit, rank=len(specs[0]["shape"]))
        arrays = []
        for i, chunks in enumerate(parts):
            expected = len(specs[i]["shape"])
            chunks = [c if c.ndim == expected else c[None] for c in chunks]
            arrays.append(np.concatenate(chunks) if chunks else np.zeros((0,)))
    else:
        arrays = _as_arrays(data, names)
    if len(arrays) != n:
        raise ValueError(f"`representative_data` must hold {n} arrays, one per model input "
                         f"({', '.join(s['name'] for s in specs)}); received {len(arrays)}.")
    count = None
    for array, s in zip(arrays, specs):
        want = tuple(s["shape"][1:])
        got = tuple(array.shape[1:])
        if array.ndim != len(s["shape"]) or any(w is not None and w != g for w, g in zip(want, got)):
            expected = "(n, " + ", ".join(str(w) for w in want) + ")"
            raise ValueError(
                f"`representative_data` for input '{s['name']}' has shape {tuple(array.shape)}; the model "
                f"expects {expected} (samples along the first axis).")
        if count is not None and len(array) != count:
            raise ValueError("`representative_data` arrays must hold the same number of samples.")
        count = len(array)
    batch = specs[0]["shape"][0] or 1
    samples = []
    for k in range(0, min(count, limit * batch) - batch + 1, batch):
        samples.append([np.asarray(a[k:k + batch], _np_dtype(s["dtype"])) for a, s in zip(arrays, specs)])
    if count and not samples:
        raise ValueError(f"`representative_data` has {count} samples; need at least batch_size={batch}.")
    return samples


def _np_dtype(dtype):
    return np.dtype(dtype) if dtype not in ("float16", "bfloat16") else np.float32


def random_samples(specs, n):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        sample = []
        for s in specs:
            shape = [d if d is not None else 1 for d in s["shape"]]
            dtype = _np_dtype(s["dtype"])
            sample.append(rng.normal(size=shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype))
        out.append(sample)
    return out
