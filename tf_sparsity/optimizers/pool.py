"""Which variables GSM's global pool holds, and their display names."""

import re

import keras

__all__ = ["default_pool", "display_name", "pool_path", "pool_predicate"]


def default_pool(variable):
    """The default GSM pool: every trainable variable of rank >= 2 (kernels)."""
    return len(variable.shape) >= 2


def pool_predicate(pool):
    """Turn the `pool` argument into `variable -> bool`."""
    if pool is None:
        return default_pool
    if isinstance(pool, str):
        pool = [pool]
    if isinstance(pool, (list, tuple)):
        if not pool or not all(isinstance(p, str) for p in pool):
            raise ValueError(
                "`pool` must be None, a callable `variable -> bool`, or a regex / list of "
                f"regexes matched against variable paths; received {pool!r}."
            )
        patterns = [re.compile(p) for p in pool]
        return lambda v: any(p.search(pool_path(v)) for p in patterns)
    if isinstance(pool, dict):  # a serialized registered function
        return keras.saving.deserialize_keras_object(pool)
    if callable(pool):
        return pool
    raise ValueError(
        "`pool` must be None, a callable `variable -> bool`, or a regex / list of "
        f"regexes matched against variable paths; received {pool!r}."
    )


def pool_path(variable):
    return getattr(variable, "path", None) or variable.name


def display_name(variable):
    """Short key for a pool variable: its path without a trailing `/kernel`."""
    path = pool_path(variable)
    return path[: -len("/kernel")] if path.endswith("/kernel") else path
