"""Cell architectures shared by the STR cells and their factorized forms:
how the two projections become the next state (GRU, LSTM, FastGRNN), and the
summary row every low-rank or factorized cell reports."""

import keras
import numpy as np
from keras import ops

from tf_sparsity.layers.low_rank.checks import _check_units
from tf_sparsity.report import LayerReport


class _Architecture:
    """Gate math shared by the STR cells and their factorized (stripped) forms.

    A cell computes `x @ W` and `h @ U` (gates stacked along the last axis
    as in Keras) and hands them to `_combine` as lists of per-gate
    `units`-wide blocks; `_combine` adds biases and applies the gates.
    `joint_gates`: the gates whose two projections are only ever summed; a
    cell may compute them as one product `[x, h] @ [W_g; U_g]` and pass
    them as `_combine(..., joint=...)` (None for the other gates).
    """

    gates = 1
    kind = None
    joint_gates = (0,)

    def _init_architecture(self, units, activation, recurrent_activation):
        self.units = _check_units(units)
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.output_size = self.units

    def _architecture_config(self):
        return {
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
        }

    def _bias(self, name, shape, initializer):
        return self.add_weight(name=name, shape=shape, initializer=initializer)

    def _gate_slices(self, tensor):
        """Split the last axis into the gates' `units`-wide blocks."""
        return [tensor[..., g * self.units:(g + 1) * self.units] for g in range(self.gates)]

    def get_initial_state(self, batch_size=None):
        sizes = self.state_size if isinstance(self.state_size, (list, tuple)) else [self.state_size]
        return [ops.zeros((batch_size, d), dtype=self.compute_dtype) for d in sizes]


class _GRU(_Architecture):
    """Keras' GRU (reset gate after the recurrent matmul: `reset_after=True`)."""

    gates = 3
    kind = "GRU"
    joint_gates = (0, 1)  # update, reset: the candidate multiplies h @ U by r
    bias_names = ("bias",)

    def _init_state(self):
        self.state_size = self.units

    def _build_biases(self):
        # Separate input / recurrent biases, Keras' (2, 3·units) layout.
        self.bias = self._bias("bias", (2, 3 * self.units), "zeros")

    def _combine(self, xw, hu, states, joint=None):
        h = states[0] if isinstance(states, (list, tuple)) else states
        bias = ops.cast(self.bias, h.dtype)
        b_x, b_h = self._gate_slices(bias[0]), self._gate_slices(bias[1])
        if joint is None:
            x_z, x_r, x_h = (x + b for x, b in zip(xw, b_x))
            h_z, h_r, h_h = (x + b for x, b in zip(hu, b_h))
            z = self.recurrent_activation(x_z + h_z)
            r = self.recurrent_activation(x_r + h_r)
        else:  # joint[g] = x @ W_g + h @ U_g for the update and reset gates
            x_h, h_h = xw[2] + b_x[2], hu[2] + b_h[2]
            z = self.recurrent_activation(joint[0] + (b_x[0] + b_h[0]))
            r = self.recurrent_activation(joint[1] + (b_x[1] + b_h[1]))
        candidate = self.activation(x_h + r * h_h)
        new_h = z * h + (1.0 - z) * candidate
        return new_h, [new_h] if isinstance(states, (list, tuple)) else new_h


class _LSTM(_Architecture):
    """Keras' LSTM: gates (i, f, c, o), forget-gate bias initialized to 1."""

    gates = 4
    kind = "LSTM"
    joint_gates = (0, 1, 2, 3)
    bias_names = ("bias",)

    def _init_state(self):
        self.state_size = [self.units, self.units]

    def _build_biases(self):
        units = self.units

        def unit_forget_bias(shape, dtype=None):
            return ops.cast(ops.concatenate(
                [ops.zeros((units,)), ops.ones((units,)), ops.zeros((2 * units,))]), dtype or "float32")

        self.bias = self._bias("bias", (4 * self.units,), unit_forget_bias)

    def _combine(self, xw, hu, states, joint=None):
        h, c = states
        bias = self._gate_slices(ops.cast(self.bias, h.dtype))
        if joint is None:
            z_i, z_f, z_c, z_o = (x + u + b for x, u, b in zip(xw, hu, bias))
        else:  # joint[g] = x @ W_g + h @ U_g for every gate
            z_i, z_f, z_c, z_o = (j + b for j, b in zip(joint, bias))
        i = self.recurrent_activation(z_i)
        f = self.recurrent_activation(z_f)
        c = f * c + i * self.activation(z_c)
        o = self.recurrent_activation(z_o)
        new_h = o * self.activation(c)
        return new_h, [new_h, c]


class _FastGRNN(_Architecture):
    """FastGRNN (Kusupati et al., NeurIPS 2018): one W, one U shared by both gates.

        z  = σ(Wx + Uh + b_g),   c = tanh(Wx + Uh + b_u)
        h' = z ⊙ h + (σ(ζ)(1 − z) + σ(ν)) ⊙ c

    ζ, ν are trainable scalars; initial values and the all-ones biases follow
    the authors' EdgeML code (ζ = 1, ν = −4).
    """

    gates = 1
    kind = "FastGRNN"
    bias_names = ("bias_gate", "bias_update", "zeta", "nu")

    def _init_state(self):
        self.state_size = self.units

    def _build_biases(self):
        self.bias_gate = self._bias("bias_gate", (self.units,), "ones")
        self.bias_update = self._bias("bias_update", (self.units,), "ones")
        self.zeta = self.add_weight(name="zeta", shape=(),
                                    initializer=keras.initializers.Constant(self.zeta_init))
        self.nu = self.add_weight(name="nu", shape=(), initializer=keras.initializers.Constant(self.nu_init))

    def _combine(self, xw, hu, states, joint=None):
        h = states[0] if isinstance(states, (list, tuple)) else states
        pre = xw[0] + hu[0] if joint is None else joint[0]
        z = self.recurrent_activation(pre + ops.cast(self.bias_gate, pre.dtype))
        c = self.activation(pre + ops.cast(self.bias_update, pre.dtype))
        zeta = ops.cast(ops.sigmoid(ops.cast(self.zeta, "float32")), pre.dtype)
        nu = ops.cast(ops.sigmoid(ops.cast(self.nu, "float32")), pre.dtype)
        new_h = z * h + (zeta * (1.0 - z) + nu) * c
        return new_h, [new_h] if isinstance(states, (list, tuple)) else new_h

    def _architecture_config(self):
        config = super()._architecture_config()
        config.update(zeta_init=self.zeta_init, nu_init=self.nu_init)
        return config


def cell_report(cell, timesteps, name):
    """Summary of a low-rank or factorized cell (stored params, MACs per example)."""
    dims = cell.matrix_shapes()
    ranks = cell.ranks()
    steps = timesteps or 1
    dense_entries = sum(r * c for r, c in dims)
    # What the stripped cell stores per matrix: dense, rank-r factors, or nothing.
    stored = sum(rows * cols if rank is None else min(rank * (rows + cols), rows * cols)
                 for (rows, cols), rank in zip(dims, ranks))
    # Thresholds are bookkeeping, not params.
    bookkeeping = {id(v) for v in cell.bookkeeping_weights()}
    trained = [w for w in cell.weights if id(w) not in bookkeeping]
    params = sum(int(np.prod(w.shape)) for w in trained)
    nbytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in trained)
    limits = cell.max_ranks()
    rank_text = ", ".join(  # "input, recurrent"; a matrix stored dense says so
        f"{limit}/{limit} dense" if r is None else f"{r}/{limit}" for r, limit in zip(ranks, limits))
    threshold = cell.threshold_value()
    return LayerReport(
        name=name or cell.name, type=type(cell).__name__, params=params,
        prunable=dense_entries, nonzeros=stored, threshold=threshold,
        flops=dense_entries * steps, effective_flops=stored * steps, bytes=nbytes, rank=rank_text,
    )
