"""Layer collapse judged by connectivity: does the pruned output still depend on the input?

SynFlow's notion of collapse is a network that can no longer pass signal. In
a chain (VGG) that is the same as "some layer lost every weight"; in
residual networks it is not: an emptied residual branch (or squeeze-excite
gate) leaves the skip path carrying the signal. Two facts per pruned model:

- **connected**: every model output depends on the input through alive
  weights. Computed on the masks at channel level: the linearized network
  (`flow_network`, mode "reach") with each alive weight 1, offsets dropped,
  and every tensor reduced to "depends on the input". This also catches
  networks cut without any empty layer (the alive weights of one layer feed
  only channels the next layer no longer reads). A `Multiply` (gate) depends
  on the input if either factor does (the other is then a nonzero constant).
- for each **empty** prunable layer, whether it is a **cut** (structurally,
  removing that layer alone disconnects some output from the input: it lies
  on every path) or an **emptied branch** (a residual branch or gate that a
  parallel path bypasses).

A model is **collapsed** when it is not connected. For layers the reach
network cannot evaluate, connectivity falls back to the layer graph (remove
the empty layers, is an output still reachable?).
"""

import dataclasses
import warnings

import numpy as np

from tf_sparsity import _compat
from tf_sparsity import prunable, surgery
from tf_sparsity.collapse import EmptiedBranchWarning  # noqa: F401  (re-exported)
from tf_sparsity.pruning import flow_network


@dataclasses.dataclass
class ConnectivityReport:
    """What pruning left of the network's input-output paths.

    Attributes:
        connected: every output depends on the input through alive weights.
        outputs_connected: the same per model output.
        empty: prunable layers without any weight (the per-layer collapse
            definition of the SynFlow paper).
        cuts: empty layers that lie on every path to some output.
        emptied_branches: empty layers that a parallel path bypasses
            (residual branches, squeeze-excite gates).
        level: "channel" (masks through the reach network) or "layer".
    """

    connected: bool
    outputs_connected: list
    empty: list
    cuts: list
    emptied_branches: list
    level: str = "channel"

    @property
    def collapsed(self):
        """True when the output no longer depends on the input."""
        return not self.connected


def structural_cuts(model):
    """Names of the prunable layers that lie on every input-output path.

    Layer-graph reachability: a layer is a cut if removing it alone leaves
    some output unreachable from every input. `Add`, `Concatenate` and
    `Multiply` pass dependence from any of their inputs.

    Args:
        model: built functional / Sequential Keras model.

    >>> import keras
    >>> x = keras.Input((4,))
    >>> h = keras.layers.Dense(4, name="a")(x)
    >>> y = keras.layers.Add()([h, keras.layers.Dense(4, name="branch")(h)])
    >>> sorted(structural_cuts(keras.Model(x, keras.layers.Dense(2, name="head")(y))))
    ['a', 'head']
    """
    graph = _layer_graph(model)
    names = [n for n in graph["prunable"]]
    return [n for n in names if not all(_reachable(graph, {n}))]


def _layer_graph(model, graph=None, prefix_inputs=None):
    inputs, outputs, nodes = _compat.graph_nodes(model)
    producers, edges, prunable_names = {}, [], []
    for i, node in enumerate(nodes):
        for t in node.outputs:
            producers[id(t)] = i
    for i, node in enumerate(nodes):
        op = node.operation
        if _compat.is_graph_model(op):
            inner = [l.name for l in prunable.iter_layers(op) if prunable.is_prunable(l)]
        else:
            inner = [op.name] if prunable.is_prunable(op) else []
        prunable_names += inner
        sources = [producers.get(id(t), "input") for t in node.input_tensors]
        edges.append((inner, sources))
    return {"edges": edges, "outputs": [producers.get(id(t), "input") for t in outputs],
            "prunable": prunable_names}


def _reachable(graph, removed):
    """Per output: reachable from the input when the layers in `removed` pass nothing."""
    alive = []
    for names, sources in graph["edges"]:
        reach = any(s == "input" or alive[s] for s in sources)
        alive.append(reach and not any(n in removed for n in names))
    return [o == "input" or alive[o] for o in graph["outputs"]]


class Checker:
    """Connectivity of one model under changing masks (built once, checked often).

    Args:
        model: the plain (unwrapped) model, e.g. `tfs.strip(masked)`.
        kernels: `(layer name, kernel index)` of each mask, in order.

    >>> import keras, numpy as np
    >>> x = keras.Input((4,))
    >>> h = keras.layers.Dense(4, name="a")(x)
    >>> y = keras.layers.Add()([h, keras.layers.Dense(4, name="branch")(h)])
    >>> m = keras.Model(x, keras.layers.Dense(2, name="head")(y))
    >>> checker = Checker(m, [("a", 0), ("branch", 0), ("head", 0)])
    >>> r = checker.check([np.ones((4, 4)), np.zeros((4, 4)), np.ones((4, 2))])
    >>> r.connected, r.emptied_branches, r.cuts
    (True, ['branch'], [])
    """

    def __init__(self, model, kernels):
        self.kernels = [tuple(k) for k in kernels]
        self.graph = _layer_graph(model)
        cut_names = set(structural_cuts(model))
        self.cut_names = cut_names
        self.reach = flow_network.SynFlowNetwork(model, self.kernels, mode="reach")
        if not self.reach.supported:
            self.reach = None

    def check(self, masks):
        """A `ConnectivityReport` for 0/1 `masks` (one per kernel)."""
        alive = {}
        for (name, _), m in zip(self.kernels, masks):
            alive[name] = alive.get(name, 0) + int(np.count_nonzero(np.asarray(m)))
        empty = [n for n, c in alive.items() if c == 0]
        if self.reach is not None:
            outputs = self.reach.reaches(masks)
            level = "channel"
        else:
            outputs = _reachable(self.graph, set(empty))
            level = "layer"
        cuts = [n for n in empty if n in self.cut_names]
        branches = [n for n in empty if n not in self.cut_names]
        return ConnectivityReport(all(outputs), outputs, empty, cuts, branches, level)


def check(model):
    """Connectivity of a pruned model (`tfs.layers.Masked` wrappers, or plain with zeros).

    Args:
        model: a model returned by `tfs.prune_at_init` (or any wrapped
            model), or a plain model whose pruned weights are zeros.

    Returns:
        a `ConnectivityReport`.

    >>> import tf_sparsity as tfs
    >>> sparse = tfs.prune_at_init(tfs.zoo.mnist1d_cnn(), "synflow", compression=10, iterations=5, verbose=0)
    >>> r = tfs.pruning.connectivity.check(sparse)
    >>> r.connected, r.empty
    (True, [])
    """
    wrappers = surgery.wrappers(model)
    if wrappers:
        kernels = [(w.layer.name, i) for w in wrappers for i in range(len(w.kernels))]
        masks = [np.asarray(m.numpy()) for w in wrappers for m in w.masks]
        plain = surgery.strip(model)
    else:
        plain = model
        layers = [l for l in prunable.iter_layers(model) if prunable.is_prunable(l)]
        kernels = [(l.name, i) for l in layers for i in range(len(prunable.prunable_kernels(l)))]
        masks = [(k.numpy() != 0).astype("float32") for l in layers for k in prunable.prunable_kernels(l)]
    return Checker(plain, kernels).check(masks)


def collapse_names(report, method, compression, on_collapse="warn"):
    """The names `prune_at_init` reports as layer collapse, from a `ConnectivityReport`.

    Connected networks are not collapsed: emptied residual branches / gates
    get an `EmptiedBranchWarning` (unless `on_collapse="ignore"`) and an
    empty list is returned. Otherwise: the empty cut layers, else every empty
    layer, else a note that no path is left although no layer is empty.

    >>> r = ConnectivityReport(False, [False], [], [], [])
    >>> collapse_names(r, "random", 1e4)
    ['(no empty layer: the alive weights no longer connect input and output)']
    """
    if report.connected:
        if report.emptied_branches and on_collapse != "ignore":
            warnings.warn(f"{method} at compression {compression:.3g} emptied {report.emptied_branches} "
                          "(residual branches / gates); the network stays connected.",
                          EmptiedBranchWarning, stacklevel=3)
        return []
    return report.cuts or report.empty or [
        "(no empty layer: the alive weights no longer connect input and output)"]
