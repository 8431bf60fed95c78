"""Argument checks shared by the low-rank matrices and cells."""

import math

import numpy as np


def _check_rank_arg(max_rank, argument="max_rank"):
    """Normalize `max_rank` to an (input, recurrent) pair of int-or-None."""
    pair = tuple(max_rank) if isinstance(max_rank, (list, tuple)) else (max_rank, max_rank)
    if len(pair) != 2:
        raise ValueError(
            f"`{argument}` must be None, an integer >= 1, or a pair (input rank, recurrent "
            f"rank); received {max_rank!r}."
        )
    for value in pair:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"`{argument}` must be None, an integer >= 1, or a pair of those (input rank, "
                f"recurrent rank); received {max_rank!r}."
            )
    return tuple(None if v is None else int(v) for v in pair)


def _check_number(value, argument, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{argument}` must be a finite number; received {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{argument}` must be a number >= {minimum}; received {value!r}.")
    return float(value)


def _check_units(units):
    if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
        raise ValueError(f"`units` must be a positive integer; received {units!r}.")
    return int(units)


def _factored_is_smaller(rank, rows, cols):
    """Whether rank-`rank` factors store fewer numbers than the dense matrix."""
    return rank * (rows + cols) < rows * cols
