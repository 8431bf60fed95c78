"""The one door to private Keras / TensorFlow APIs.

Every `keras.src...` / `tensorflow.python...` import and every private
attribute the package relies on is reached through this module, so a Keras or
TensorFlow upgrade breaks one file, not many. Each entry says what it is for
and the versions it was checked on (Keras 3.12-3.15, TensorFlow 2.21).
Nothing outside this module imports private APIs.
"""

import keras
import tensorflow as tf
from keras.src.backend.common.stateless_scope import get_stateless_scope as _get_stateless_scope
from keras.src.models import Functional
from keras.src.ops.function import Function as _Function
from keras.src.saving import serialization_lib as _serialization_lib

__all__ = [
    "Functional", "graph_nodes", "graph_slice", "in_xla_context", "inbound_node_count", "maybe_merge_call",
    "optimizer_strategy", "outbound_operations", "stateless_scope", "unsafe_deserialization",
    "all_reduce_sum_gradients", "symbolic_build", "per_tensor_int8_dense_weights", "graph_calls", "graph_nodes",
    "is_activation_operation", "is_elementwise_operation", "is_graph_model", "run_graph", "sublayers",
]

# `keras.Model` subclasses that `map_layers` can rebuild (Keras 3.12-3.15: the
# functional class is public only as the type of `keras.Model(inputs, outputs)`).
REBUILDABLE_MODELS = (keras.Sequential, Functional)


def stateless_scope():
    """The enclosing `keras.StatelessScope`, or None (Keras 3.12-3.15).

    KernelWrapper needs it to keep values an outer stateless call has set.
    """
    return _get_stateless_scope()


def graph_slice(inputs, outputs):
    """A callable running the part of an existing functional graph between
    `inputs` and `outputs`, without adding nodes to the layers (a
    `keras.Model` from intermediate tensors would). Keras 3.12-3.15."""
    return _Function(inputs, outputs)


def unsafe_deserialization():
    """Context manager allowing lambdas when re-creating layers from config
    (a model's own layers, not user files). Keras 3.12-3.15."""
    return _serialization_lib.SafeModeScope(False)


def inbound_node_count(layer):
    """How many times `layer` is called in the graph (shared layers: > 1). Keras 3.12-3.15."""
    return len(layer._inbound_nodes)


def _nodes_in_order(model):
    """Every node of a functional / Sequential model's graph, inputs first
    (`_functional`, `_nodes_by_depth`; Keras 3.12-3.15)."""
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise ValueError(f"Sequential model '{model.name}' must be built with an Input.")
        model = model._functional
    for depth in sorted(model._nodes_by_depth, reverse=True):
        yield from model._nodes_by_depth[depth]


def graph_calls(model):
    """`(operation, input tensors, output tensors)` of every call in `model`'s
    graph, input layers included, in topological order. Used by channel groups."""
    return [(node.operation, list(node.input_tensors), list(node.output_tensors))
            for node in _nodes_in_order(model)]


def outbound_operations(layer):
    """The operations (layers) that consume `layer`'s outputs. Keras 3.12-3.15."""
    return [node.operation for node in layer._outbound_nodes]


def in_xla_context():
    """True inside a jit-compiled (XLA) function. TF 2.21; False if the API moved."""
    try:
        from tensorflow.python.ops import control_flow_util

        return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except Exception:  # private API moved: assume no XLA
        return False


def maybe_merge_call(fn, strategy, *args):
    """Run `fn(strategy, *args)` in cross-replica context when inside
    `strategy.run` (tf.distribute's own merge helper). TF 2.21."""
    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


def optimizer_strategy(optimizer):
    """The `tf.distribute` strategy a Keras 3 TF optimizer was built under. Keras 3.12-3.15."""
    return optimizer._distribution_strategy


def all_reduce_sum_gradients(optimizer, grads_and_vars):
    """Sum gradients over replicas (a no-op outside a replica context), via the
    Keras TF optimizer's own helper. Keras 3.12-3.15."""
    return optimizer._all_reduce_sum_gradients(grads_and_vars)


def symbolic_build(model, data_batch):
    """Build a compiled model's loss, metrics and optimizer from one batch's shapes,
    as `fit` does before tracing its step (`Trainer._symbolic_build`; no public
    equivalent). Keras 3.15. Used by `tfs.distribute.fit`."""
    model._symbolic_build(data_batch=data_batch)


def per_tensor_int8_dense_weights(converter):
    """Ask a `TFLiteConverter` for per-tensor int8 FULLY_CONNECTED weights (one
    multiplier per op, not per channel): a private converter attribute, TF 2.21.
    Used by the recurrent step form."""
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True


def graph_nodes(model):
    """`(inputs, outputs, nodes)` of `model`'s layer graph, nodes in execution order
    (private `_functional`, `_nodes_by_depth`; Keras 3.15). Used by SynFlow's flow
    network and the connectivity check.

    Each node has `.operation`, `.input_tensors` and `.outputs` (Keras 3).
    Sequential models are read through their functional graph.

    Args:
        model: a built functional or Sequential Keras model.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    >>> [n.operation.name for n in graph_nodes(m)[2]]
    ['d']
    """
    nodes = [n for n in _nodes_in_order(model) if n.operation is not None and not n.is_input]
    graph = model._functional if isinstance(model, keras.Sequential) else model
    return list(graph.inputs), list(graph.outputs), nodes


def run_graph(graph, inputs, wrap):
    """Run `graph` (a `graph_slice`, or a functional / Sequential model) on
    `inputs`, calling `wrap(operation)(*args, **kwargs)` in place of each
    operation (`Function._run_through_graph`; Keras 3.15). `wrap` returns
    the operation itself to run it unchanged. Used by greedy's batched
    candidates to scale a layer's input.

    Args:
        graph: what `graph_slice` returns, or a built functional / Sequential model.
        inputs: one tensor per graph input, in order.
        wrap: `operation -> callable`.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    >>> double = lambda op: (lambda x: op(2 * x))
    >>> float(run_graph(m, [keras.ops.ones((1, 2))], double)[0][0, 0])
    4.0
    """
    if isinstance(graph, keras.Sequential):
        if getattr(graph, "_functional", None) is None:
            raise ValueError(f"Sequential model '{graph.name}' must be built with an Input.")
        graph = graph._functional
    out = graph._run_through_graph(list(inputs), operation_fn=wrap)
    return out if isinstance(out, (list, tuple)) else [out]


def sublayers(layer):
    """Every layer tracked inside `layer`, at any depth, in Keras' tracking
    order (`Layer._flatten_layers`; Keras 3.12-3.15). How `prunable` finds the
    kernels of attention layers, custom layers and subclassed models."""
    return list(layer._flatten_layers(include_self=False, recursive=True))


# Keras operation nodes (`keras.src.ops`, `keras.src.activations`; what `+`, `*` and `keras.ops.*` on
# symbolic tensors become) that act on each element alone: channel j of the
# output reads channel j of each input only. Names checked on Keras 3.15.
# The activations among them (SynFlow's linearization makes these the identity).
_ACTIVATION_OPERATIONS = frozenset((
    "ReLU", "Tanh", "Relu", "Relu6", "Sigmoid", "Silu", "Swish", "Gelu", "Elu", "Selu", "Celu",
    "LeakyRelu", "Softplus", "Softsign", "HardSigmoid", "HardSilu", "HardSwish", "LogSigmoid",
    "Mish", "HardTanh", "SoftShrink", "HardShrink", "TanhShrink",
))
_ELEMENTWISE_OPERATIONS = _ACTIVATION_OPERATIONS | frozenset((
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Power",
    "Abs", "Absolute", "Negative", "Exp", "Expm1", "Log", "Log1p", "Sqrt", "Square", "Sign",
    "Sin", "Cos", "Clip", "Cast", "Reciprocal", "Rsqrt", "Erf",
))


def _operation_named(op, names):
    module = type(op).__module__  # `keras.ops.*`; `keras.activations.relu` / `mish` are Operations too
    return (not isinstance(op, keras.layers.Layer) and module.startswith(("keras.src.ops", "keras.src.activations"))
            and type(op).__name__ in names)


def is_elementwise_operation(op):
    """True for an elementwise Keras operation node that is not a layer
    (`h + i`, `h * 0.5`, `keras.ops.tanh(h)`). Used by the channel analysis."""
    return _operation_named(op, _ELEMENTWISE_OPERATIONS)


def is_activation_operation(op):
    """True for an activation applied as an operation node (`keras.ops.tanh(h)`,
    `keras.activations.gelu(h)`). Used by SynFlow's linearization."""
    return _operation_named(op, _ACTIVATION_OPERATIONS)


def is_graph_model(layer):
    """True for functional and Sequential models (whose graph `graph_nodes` reads)."""
    return isinstance(layer, REBUILDABLE_MODELS)


class without_graph_optimizer:
    """Context: tf.functions first called inside skip Grappler (TensorFlow's graph optimizer).

    SynFlow's flow network of ResNet50 is ~8.7k ops; Grappler spends more on
    it than it saves (measured: first call 9.7 s -> 5.4 s, rounds no slower).
    Process-wide TensorFlow option, restored on exit; functions called both
    inside and outside are instantiated twice.
    """

    def __enter__(self):
        self._saved = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
        return self

    def __exit__(self, *exc):
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": self._saved})
        return False
