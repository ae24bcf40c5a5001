"""Channel-flow analysis of a functional Keras model: which output channels can be removed.

Every tensor's last axis (its channels) is described by a *layout*: a tuple of channel
*spaces*, one per contiguous segment (one segment normally; several after a Concatenate;
``H*W`` repetitions after a Flatten). A space is born at a producer (Conv2D, Dense,
SeparableConv2D: new output channels), at the model input, or at a layer we do not
understand (a *barrier*). Channel-transparent layers (BatchNorm, activations, pooling,
padding, dropout, DepthwiseConv2D with depth_multiplier 1) pass the layout through;
element-wise merges (Add, Multiply, ...) tie the spaces of their inputs into one (a
union-find); Concatenate joins layouts; Flatten repeats them.

A *channel pad* (the shortcut of the CIFAR ResNets of He et al., option A: Reshape to
(positions, channels), Permute, ZeroPadding1D, Permute, Reshape back) widens the channel
axis with zeros: its output layout is (zeros, input layout, zeros). When an Add then meets a
layout cut at other places (a conv's 32 channels against 8 zeros + 16 + 8 zeros), both are
cut at each other's boundaries (spaces are *split*, for every tensor that carries them) and
tied segment by segment. A residual stream so becomes prunable through its down-sampling
blocks: the stream entering a stage is one group, and each band of padded zeros is another
(pruning k of those channels means padding by k fewer zeros).

A space that reaches a barrier, the model input or a model output is *fixed* (its
channels must all stay). Every other space is a prunable **channel group**: the
producers whose outputs were tied together, pruned with one set of kept indices.

The analysis also knows, for every counted layer (see ``pocketflow.metrics``), how its
input and output channel counts depend on the groups' keep counts, so ``macs_for`` gives
the exact MACs of a pruned candidate without rebuilding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from learners.channel_pruning import tf_ops
from learners.channel_pruning.layer_rules import rule_for
from learners.channel_pruning.kinds import (  # noqa: F401 - re-exported: the kinds are part of this API
    KIND_BARRIER, KIND_BATCHNORM, KIND_CHANNEL_PAD, KIND_CONCAT, KIND_DEPTHWISE, KIND_FLATTEN, KIND_INPUT,
    KIND_MERGE, KIND_NESTED, KIND_PAD_PART, KIND_PRODUCER, KIND_TRANSPARENT,
)
from pocketflow import metrics

layers = tf.keras.layers

Layout = Tuple[int, ...]  # space ids, one per segment of the channel axis

_CHANNELS_LAST = "channels_last"


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels of ``producers`` that are pruned together (one set of kept indices).

    ``consumers``: layers whose weights are sliced along their input channels (BatchNorm,
    DepthwiseConv2D, the next Conv2D/Dense, ...). ``terminators``: the Conv/Dense/
    SeparableConv layers that read these channels and end them (what a reconstruction
    re-fits). ``macs``: MACs of the layers whose cost depends on this group, at full width.
    """

    name: str
    producers: Tuple[str, ...]
    channels: int
    consumers: Tuple[str, ...]
    terminators: Tuple[str, ...]
    macs: int
    segment: bool = False  # every producer's output also carries other channels (a band of a residual stream)


@dataclass(frozen=True)
class Barrier:
    """A layer the analysis does not see through; the channels feeding it are kept."""

    layer: str
    class_name: str
    reason: str


@dataclass
class _LayerInfo:
    name: str
    kind: str
    in_layouts: List[Layout]
    out_layouts: List[Layout]
    in_shapes: List[tuple]
    out_shapes: List[tuple]


@dataclass
class _MacTerm:
    """One counted layer: MACs = counter(layer, in_shape with in_channels, out_shape with out_channels)."""

    layer: tf.keras.layers.Layer
    in_shape: tuple
    out_shape: tuple
    in_form: Tuple[int, Dict[str, int]]   # constant + multiplicity per group
    out_form: Tuple[int, Dict[str, int]]


class _Spaces:
    """Union-find over channel spaces; a root carries a reason when it is fixed.

    A root can be *split* into consecutive children; a layout is read through ``expand``,
    which replaces every space by its current leaves, so a split made late in the walk holds
    for every tensor that carried the space earlier.
    """

    def __init__(self) -> None:
        self.parent: List[int] = []
        self.size: List[int] = []
        self.reason: List[Optional[str]] = []
        self.origin: List[Optional[str]] = []  # producer layer name, or None
        self.children: List[Optional[List[int]]] = []

    def new(self, size: int, origin: Optional[str] = None, reason: Optional[str] = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.reason.append(reason)
        self.origin.append(origin)
        self.children.append(None)
        return len(self.parent) - 1

    def leaves(self, space: int) -> List[int]:
        """The unsplit roots that make up ``space``, in channel order."""
        root = self.find(space)
        if self.children[root] is None:
            return [root]
        return [leaf for child in self.children[root] for leaf in self.leaves(child)]

    def expand(self, layout: Layout) -> Layout:
        return tuple(leaf for space in layout for leaf in self.leaves(space))

    def tie(self, first: Layout, second: Layout) -> None:
        """Make two layouts of equal width the same channels: cut each at the other's segment
        boundaries, then unite them segment by segment."""
        while True:
            a, b = self.expand(first), self.expand(second)
            cuts_a = set(np.cumsum([self.size[s] for s in a]).tolist())
            cuts_b = set(np.cumsum([self.size[s] for s in b]).tolist())
            missing = sorted(cuts_a ^ cuts_b)
            if not missing:
                break
            cut = missing[0]
            layout = b if cut in cuts_a else a
            start = 0
            for leaf in layout:
                if start < cut < start + self.size[leaf]:
                    self._split(leaf, cut - start)
                    break
                start += self.size[leaf]
        for x, y in zip(a, b):
            self.union(x, y)

    def _split(self, leaf: int, first: int) -> None:
        sizes = (first, self.size[leaf] - first)
        self.children[leaf] = [self.new(size, self.origin[leaf], self.reason[leaf]) for size in sizes]

    def find(self, space: int) -> int:
        root = space
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[space] != root:
            self.parent[space], space = root, self.parent[space]
        return root

    def union(self, first: int, second: int) -> int:
        a, b = self.find(first), self.find(second)
        if a == b:
            return a
        if self.reason[a] is None and self.reason[b] is not None:
            a, b = b, a  # keep the reason of the fixed one
        self.parent[b] = a
        return a

    def fix(self, space: int, reason: str) -> None:
        for root in self.leaves(space):
            if self.reason[root] is None:
                self.reason[root] = reason


def _channels(shape: Sequence) -> int:
    if len(shape) < 2 or shape[-1] is None:
        return 0
    return int(shape[-1])


def _flat_shapes(tensors) -> List[tuple]:
    return [tuple(t.shape) for t in tf.nest.flatten(tensors)]


def _classify(layer: tf.keras.layers.Layer, in_shapes: List[tuple],
              out_shapes: List[tuple]) -> Tuple[str, str]:
    """(kind, reason) of a layer called once; reason explains a barrier."""
    name = type(layer).__name__
    if isinstance(layer, layers.InputLayer):
        return KIND_INPUT, ""
    if len(out_shapes) != 1:
        return KIND_BARRIER, f"{name} has {len(out_shapes)} outputs"
    if any(_channels(shape) == 0 for shape in in_shapes + out_shapes):
        return KIND_BARRIER, f"{name} has an input or output without a known channel axis"
    if getattr(layer, "data_format", _CHANNELS_LAST) != _CHANNELS_LAST:
        return KIND_BARRIER, f"{name} uses data_format={layer.data_format}"
    rule = rule_for(layer)
    if rule is not None:
        return rule.classify(layer, in_shapes, out_shapes)
    return KIND_BARRIER, f"{name} is not known to be channel-transparent"


class ChannelAnalysis:
    """Prunable channel groups of a model, its barriers, and a MAC model of candidates.

    Build it with :func:`analyze`. Group names are the name of the group's first producer.
    """

    def __init__(self, model: tf.keras.Model, spaces: _Spaces, infos: Dict[str, _LayerInfo],
                 order: List[str], barriers: List[Barrier], constant_macs: int,
                 mac_layers: List[Tuple[tf.keras.layers.Layer, tuple, tuple]],
                 successors: Dict[str, List[str]], pads: Optional[Dict[str, str]] = None,
                 pad_widths: Optional[Dict[str, Tuple[int, int]]] = None) -> None:
        self.model = model
        self._layers = {layer.name: layer for layer in model.layers}
        self._pads = dict(pads or {})
        self._pad_widths = dict(pad_widths or {})
        self._successors = successors
        self._spaces = spaces
        self._infos = infos
        self._order = order
        self.barriers: List[Barrier] = barriers
        self._constant_macs = constant_macs
        self._root_group: Dict[int, str] = {}
        self.frozen: Dict[str, str] = {}
        producers_by_root: Dict[int, List[str]] = {}
        for name in order:
            info = infos[name]
            if info.kind != KIND_PRODUCER:
                continue
            roots = [spaces.find(space) for space in info.out_layouts[0]]
            reasons = [spaces.reason[root] for root in roots if spaces.reason[root] is not None]
            if len(reasons) == len(roots):
                self.frozen[name] = reasons[0]
            for root in roots:
                if spaces.reason[root] is None:
                    members = producers_by_root.setdefault(root, [])
                    if name not in members:
                        members.append(name)
        self._group_size: Dict[str, int] = {}
        for root, producers in producers_by_root.items():
            group = self._group_name(root, producers[0])
            self._root_group[root] = group
            self._group_size[group] = spaces.size[root]
        self._mac_terms = [self._mac_term(*entry) for entry in mac_layers]
        group_macs: Dict[str, int] = {}
        for term in self._mac_terms:
            involved = set(term.in_form[1]) | set(term.out_form[1])
            if involved:
                full = self._term_macs(term, {})
                for group in involved:
                    group_macs[group] = group_macs.get(group, 0) + full
        self.groups: Dict[str, ChannelGroup] = {}
        for root, producers in producers_by_root.items():
            group = self._root_group[root]
            segment = all(len(infos[name].out_layouts[0]) > 1 for name in producers)
            consumers, terminators = [], []
            for name in order:
                info = infos[name]
                if info.kind not in (KIND_PRODUCER, KIND_DEPTHWISE, KIND_BATCHNORM):
                    continue
                if any(self._group_of(space) == group for space in info.in_layouts[0]):
                    consumers.append(name)
                    if info.kind == KIND_PRODUCER:
                        terminators.append(name)
            self.groups[group] = ChannelGroup(
                name=group, producers=tuple(producers), channels=spaces.size[root],
                consumers=tuple(consumers), terminators=tuple(terminators),
                macs=group_macs.get(group, 0), segment=segment)
        self.total_macs = self.macs_for({})

    def _group_name(self, root: int, producer: str) -> str:
        """The first producer's name; ``name[a:b]`` when the group is a band of its output channels."""
        layout = self._infos[producer].out_layouts[0]
        if len(layout) == 1:
            return producer
        start = 0
        for space in layout:
            if self._spaces.find(space) == root:
                return f"{producer}[{start}:{start + self._spaces.size[space]}]"
            start += self._spaces.size[space]
        raise AssertionError(f"{producer} does not produce space {root}")  # pragma: no cover

    def layer(self, name: str) -> tf.keras.layers.Layer:
        """The model's layer called ``name`` (from a dict: Keras' get_layer walks every layer, and
        a candidate's selection and re-fit look layers up a few thousand times)."""
        try:
            return self._layers[name]
        except KeyError:
            raise ValueError(f"no layer named '{name}' in model '{self.model.name}'") from None

    def pad_role(self, layer_name: str) -> Optional[str]:
        """'pad', 'enter', 'exit' or 'part' for the layers of a channel pad (see ``_channel_pads``)."""
        return self._pads.get(layer_name)

    def pad_widths(self, layer_name: str) -> Tuple[int, int]:
        """Zeros a channel pad adds before and after its input's channels, before pruning."""
        return self._pad_widths[layer_name]

    # ------------------------------------------------------------------ layouts
    def _group_of(self, space: int) -> Optional[str]:
        return self._root_group.get(self._spaces.find(space))

    def successors(self, layer_name: str) -> List[str]:
        """Names of the layers that read any output of ``layer_name`` in this model."""
        return list(self._successors.get(layer_name, []))

    def layer_kind(self, layer_name: str) -> Optional[str]:
        """The analysis' kind of a layer (``producer``, ``batchnorm``, ...); None for a shared one."""
        info = self._infos.get(layer_name)
        return info.kind if info else None

    def _indices(self, layout: Layout, keep: Mapping[str, np.ndarray]) -> np.ndarray:
        parts, offset = [], 0
        for space in layout:
            size = self._spaces.size[space]
            group = self._group_of(space)
            if group is not None and group in keep:
                parts.append(offset + np.asarray(keep[group], dtype=np.int64))
            else:
                parts.append(offset + np.arange(size, dtype=np.int64))
            offset += size
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def input_indices(self, layer_name: str, keep: Mapping[str, np.ndarray]) -> Optional[np.ndarray]:
        """Kept positions of the (single) input channel axis of a layer, or None if not sliceable."""
        info = self._infos.get(layer_name)
        if info is None or len(info.in_layouts) != 1:
            return None
        return self._indices(info.in_layouts[0], keep)

    def output_indices(self, layer_name: str, keep: Mapping[str, np.ndarray]) -> Optional[np.ndarray]:
        """Kept positions of the (single) output channel axis of a layer, or None."""
        info = self._infos.get(layer_name)
        if info is None or len(info.out_layouts) != 1:
            return None
        return self._indices(info.out_layouts[0], keep)

    def group_positions(self, layer_name: str, group: str, output: bool = False) -> np.ndarray:
        """Positions of ``group``'s channels on a layer's input axis (or output axis):
        array (occurrences, channels).

        Row o, column c is where channel c of the group appears for the o-th time (once per
        Concatenate segment or Flatten position that carries it).
        """
        info = self._infos[layer_name]
        rows, offset = [], 0
        for space in (info.out_layouts if output else info.in_layouts)[0]:
            size = self._spaces.size[space]
            if self._group_of(space) == group:
                rows.append(offset + np.arange(size, dtype=np.int64))
            offset += size
        return np.stack(rows) if rows else np.zeros((0, self.groups[group].channels), dtype=np.int64)

    def check_keep(self, keep: Mapping[str, Iterable[int]]) -> Dict[str, np.ndarray]:
        """Validated kept indices (sorted int arrays); groups kept whole are dropped."""
        result: Dict[str, np.ndarray] = {}
        for group, indices in keep.items():
            if group not in self.groups:
                known = ", ".join(self.groups) or "none"
                raise ValueError(f"unknown channel group '{group}'; prunable groups: {known}")
            channels = self.groups[group].channels
            array = np.unique(np.asarray(list(indices), dtype=np.int64))
            if array.size != len(list(indices)):
                raise ValueError(f"group '{group}': kept channel indices repeat: {list(indices)}")
            if array.size == 0:
                raise ValueError(f"group '{group}': keep at least one of its {channels} channels")
            if array[0] < 0 or array[-1] >= channels:
                raise ValueError(f"group '{group}': kept indices must lie in [0, {channels}), "
                                 f"got {array.min()}..{array.max()}")
            if array.size < channels:
                result[group] = array
        return result

    # ------------------------------------------------------------------ MACs
    def _form(self, layout: Layout) -> Tuple[int, Dict[str, int]]:
        constant, terms = 0, {}
        for space in layout:
            group = self._group_of(space)
            if group is None:
                constant += self._spaces.size[space]
            else:
                terms[group] = terms.get(group, 0) + 1
        return constant, terms

    def _mac_term(self, layer: tf.keras.layers.Layer, in_shape: tuple, out_shape: tuple) -> _MacTerm:
        info = self._infos[layer.name]
        return _MacTerm(layer, in_shape, out_shape, self._form(info.in_layouts[0]),
                        self._form(info.out_layouts[0]))

    def _term_shapes(self, term: _MacTerm, counts: Mapping[str, int]) -> Tuple[tuple, tuple]:
        """The layer's (input, output) shapes with ``counts`` channels kept."""
        def value(form: Tuple[int, Dict[str, int]]) -> int:
            constant, terms = form
            return constant + sum(multiplicity * int(counts.get(group, self._group_size[group]))
                                  for group, multiplicity in terms.items())

        return term.in_shape[:-1] + (value(term.in_form),), term.out_shape[:-1] + (value(term.out_form),)

    def _term_macs(self, term: _MacTerm, counts: Mapping[str, int]) -> int:
        in_shape, out_shape = self._term_shapes(term, counts)
        counter = metrics.mac_counter(term.layer)  # the same convention as count_macs
        return int(counter(term.layer, in_shape, out_shape))

    def macs_for(self, keep_counts: Mapping[str, int]) -> int:
        """Exact MACs (``pocketflow.metrics`` convention) with ``keep_counts[group]`` channels kept.

        Groups not named keep all their channels. No model is built: use it inside a search.
        """
        self._check_counts(keep_counts)
        return self._constant_macs + sum(self._term_macs(term, keep_counts) for term in self._mac_terms)

    def _check_counts(self, keep_counts: Mapping[str, int]) -> None:
        for group, count in keep_counts.items():
            if group not in self.groups:
                raise ValueError(f"unknown channel group '{group}'; prunable groups: {', '.join(self.groups)}")
            if not 1 <= int(count) <= self.groups[group].channels:
                raise ValueError(f"group '{group}': keep count {count} is outside "
                                 f"[1, {self.groups[group].channels}]")

    def latency_for(self, keep_counts: Mapping[str, int], width_cost: Callable[[int], float]) -> float:
        """Predicted time with ``keep_counts`` kept, in MACs at the widest probe's speed: each
        convolution's or dense layer's MACs times ``width_cost(out) / out``, where ``width_cost``
        (``pocketflow.width_cost``) gives what ``out`` output channels cost in the shipping runtime.
        Depthwise layers and the layers outside the analysis count their MACs as they are."""
        self._check_counts(keep_counts)
        total = float(self._constant_macs)
        for term in self._mac_terms:
            in_shape, out_shape = self._term_shapes(term, keep_counts)
            macs = float(metrics.mac_counter(term.layer)(term.layer, in_shape, out_shape))
            width = int(out_shape[-1])
            if width and _output_tiled(term.layer):
                macs *= width_cost(width) / width
            total += macs
        return total

    def weights_for(self, keep_counts: Mapping[str, int]) -> int:
        """Weights a deployed file stores for the counted layers with ``keep_counts`` kept: kernel
        entries plus one bias per output channel (BatchNorm folds into it). A file's size moves with
        this number when channels go (float32: 4 bytes each), which makes size targets exact
        arithmetic like ``macs_for``. A layer called twice counts once."""
        self._check_counts(keep_counts)
        total, seen = 0, set()
        for term in self._mac_terms:
            if id(term.layer) in seen:
                continue
            seen.add(id(term.layer))
            in_shape, out_shape = self._term_shapes(term, keep_counts)
            single = lambda shape: (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)  # noqa: E731
            counter = metrics.mac_counter(term.layer)
            total += int(counter(term.layer, single(in_shape), single(out_shape))) + int(out_shape[-1])
        return total

    def min_macs(self) -> int:
        """MACs when every prunable group keeps a single channel (the floor of any pruning)."""
        return self.macs_for({name: 1 for name in self.groups})

    def summary(self) -> Dict[str, object]:
        """Plain data for a report: groups, frozen producers and barriers."""
        return {
            "total_macs": self.total_macs,
            "min_macs": self.min_macs(),
            "groups": [{"name": g.name, "producers": list(g.producers), "channels": g.channels,
                        "macs": g.macs} for g in self.groups.values()],
            "frozen": dict(self.frozen),
            "barriers": [{"layer": b.layer, "class": b.class_name, "reason": b.reason}
                         for b in self.barriers],
        }


def _output_tiled(layer: tf.keras.layers.Layer) -> bool:
    """Layers computed as a matrix product whose output channels the runtime tiles (a depthwise
    layer computes each channel on its own)."""
    return (isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))
            and not isinstance(layer, tf.keras.layers.DepthwiseConv2D))


def _model_nodes(model: tf.keras.Model) -> List[object]:
    """This model's nodes in topological order (inputs first)."""
    position = {id(layer): index for index, layer in enumerate(model.layers)}
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):  # noqa: SLF001 - Keras 2 graph
        nodes.extend(sorted(model._nodes_by_depth[depth],  # noqa: SLF001
                            key=lambda node: position.get(id(node.layer), -1)))
    return nodes


def _dims(layer: tf.keras.layers.Layer) -> Tuple[int, ...]:
    return tuple(getattr(layer, "dims", ()))


def _padding_pair(layer: tf.keras.layers.Layer) -> Tuple[int, int]:
    padding = layer.padding
    return (int(padding), int(padding)) if isinstance(padding, int) else (int(padding[0]), int(padding[1]))


def _channel_pads(nodes: List[object], calls: Mapping[str, int]) -> Dict[str, str]:
    """Layers that pad the channel axis with zeros: layer name -> role.

    The chain is ``[Reshape (..., C) -> (P, C)] -> Permute(2, 1) -> ZeroPadding1D(p, q) ->
    Permute(2, 1) [-> Reshape (P, C + p + q) -> (..., C + p + q)]``, each link read only by
    the next. Roles: ``pad`` (the ZeroPadding1D), ``enter`` / ``exit`` (the Reshapes, whose
    target widths surgery rewrites), ``part`` (the Permutes).
    """
    readers: Dict[str, List[object]] = {}
    for node in nodes:
        for tensor_id in node.flat_input_ids:
            readers.setdefault(tensor_id, []).append(node)
    by_name = {node.layer.name: node for node in nodes if calls.get(node.layer.name) == 1}

    def writer(node) -> Optional[object]:
        if len(node.keras_inputs) != 1:
            return None
        return by_name.get(node.keras_inputs[0]._keras_history.layer.name)  # noqa: SLF001 - Keras 2 graph

    def only_reader(node) -> Optional[object]:
        outputs = list(node.flat_output_ids)
        found = readers.get(outputs[0], []) if len(outputs) == 1 else []
        return found[0] if len(found) == 1 and found[0].layer.name in by_name else None

    def swaps(node) -> bool:
        return (node is not None and isinstance(node.layer, layers.Permute) and _dims(node.layer) == (2, 1)
                and len(node.keras_inputs) == 1 and len(tuple(node.keras_inputs[0].shape)) == 3)

    roles: Dict[str, str] = {}
    for node in nodes:
        if not (isinstance(node.layer, layers.ZeroPadding1D) and node.layer.name in by_name):
            continue
        first, last = writer(node), only_reader(node)
        if not (swaps(first) and swaps(last) and only_reader(first) is node):
            continue
        chain = {first.layer.name: "part", node.layer.name: "pad", last.layer.name: "part"}
        entry, exit_ = writer(first), only_reader(last)
        if (entry is not None and exit_ is not None and isinstance(entry.layer, layers.Reshape)
                and isinstance(exit_.layer, layers.Reshape) and only_reader(entry) is first):
            in_shape = tuple(entry.keras_inputs[0].shape)
            out_shape = _flat_shapes(exit_.outputs)[0]
            if in_shape[1:-1] == out_shape[1:-1] and None not in in_shape[1:]:
                chain[entry.layer.name] = "enter"
                chain[exit_.layer.name] = "exit"
        roles.update(chain)
    return roles


def analyze(model: tf.keras.Model) -> ChannelAnalysis:
    """Walk a functional (or Sequential) Keras model and find its prunable channel groups."""
    if not getattr(model, "_is_graph_network", False):
        raise ValueError(f"model '{model.name}' is not a functional or Sequential model with a known "
                         "input shape; channel pruning needs its layer graph (build it with "
                         "tf.keras.Input)")
    nodes = _model_nodes(model)
    calls: Dict[str, int] = {}
    for node in nodes:
        calls[node.layer.name] = calls.get(node.layer.name, 0) + 1
    pads = _channel_pads(nodes, calls)
    pad_widths = {name: _padding_pair(model.get_layer(name)) for name, role in pads.items() if role == "pad"}

    spaces = _Spaces()
    layouts: Dict[str, Layout] = {}
    infos: Dict[str, _LayerInfo] = {}
    order: List[str] = []
    barrier_inputs: List[Tuple[Barrier, List[int]]] = []
    successors: Dict[str, List[str]] = {}
    constant_macs = 0
    mac_layers: List[Tuple[tf.keras.layers.Layer, tuple, tuple]] = []
    per_layer_macs: Optional[Dict[str, int]] = None
    counted_shared: set = set()

    for node in nodes:
        layer = node.layer
        in_ids, out_ids = list(node.flat_input_ids), list(node.flat_output_ids)
        in_shapes = [tuple(t.shape) for t in node.keras_inputs]
        out_shapes = _flat_shapes(node.outputs)
        in_layouts = [layouts[tensor_id] for tensor_id in in_ids]
        if isinstance(layer, tf.keras.Model) or calls[layer.name] > 1 or len(layer._inbound_nodes) > 1:  # noqa: SLF001
            kind = KIND_NESTED
            reason = ("nested model" if isinstance(layer, tf.keras.Model)
                      else "layer is called more than once (shared weights)")
        elif layer.name in pads:
            kind, reason = (KIND_CHANNEL_PAD if pads[layer.name] == "pad" else KIND_PAD_PART), ""
        elif tf_ops.is_tf_op(layer) and all(_channels(shape) for shape in in_shapes + out_shapes):
            op = tf_ops.classify(layer, node, in_shapes, out_shapes)
            kind, reason = op.kind, op.reason
            if kind == KIND_CHANNEL_PAD:
                pads[layer.name], pad_widths[layer.name] = "pad", op.padding
        else:
            kind, reason = _classify(layer, in_shapes, out_shapes)
        for tensor in node.keras_inputs:
            source = tensor._keras_history.layer.name  # noqa: SLF001
            if layer.name not in successors.setdefault(source, []):
                successors[source].append(layer.name)
        if kind in (KIND_NESTED, KIND_BARRIER):
            barrier_inputs.append((Barrier(layer.name, type(layer).__name__, reason),
                                   [s for layout in in_layouts for s in layout]))
            for layout in in_layouts:
                for space in layout:
                    spaces.fix(space, f"feeds {type(layer).__name__} '{layer.name}' ({reason})")
            out_layouts = [(spaces.new(_channels(shape), reason=f"comes out of barrier '{layer.name}'"),)
                           for shape in out_shapes]
        elif kind == KIND_INPUT:
            out_layouts = [(spaces.new(_channels(shape), reason="model input"),) for shape in out_shapes]
        elif kind == KIND_PRODUCER:
            out_layouts = [(spaces.new(_channels(out_shapes[0]), origin=layer.name),)]
        elif kind in (KIND_DEPTHWISE, KIND_BATCHNORM, KIND_TRANSPARENT, KIND_PAD_PART):
            out_layouts = [in_layouts[0]]
        elif kind == KIND_CHANNEL_PAD:  # zeros: spaces of no producer, tied to whatever they are added to
            before, after = pad_widths[layer.name]
            out_layouts = [((spaces.new(before),) if before else ()) + in_layouts[0]
                           + ((spaces.new(after),) if after else ())]
        elif kind == KIND_FLATTEN:
            repeats = int(np.prod(in_shapes[0][1:-1], dtype=np.int64))
            out_layouts = [in_layouts[0] * repeats]
        elif kind == KIND_CONCAT:
            out_layouts = [tuple(space for layout in in_layouts for space in layout)]
        elif kind == KIND_MERGE:  # equal shapes (checked), so equal widths: cut and tie segment by segment
            first = in_layouts[0]
            for layout in in_layouts[1:]:
                spaces.tie(first, layout)
            out_layouts = [first]
        else:  # pragma: no cover - every kind is handled above
            raise AssertionError(kind)
        for tensor_id, layout in zip(out_ids, out_layouts):
            layouts[tensor_id] = layout
        if kind == KIND_NESTED:
            if layer.name in counted_shared:
                continue  # metrics counts all calls of a shared layer at once
            counted_shared.add(layer.name)
            if per_layer_macs is None:
                per_layer_macs = metrics.layer_macs(model)
            constant_macs += sum(macs for name, macs in per_layer_macs.items()
                                 if name == layer.name or name.startswith(layer.name + "/"))
            continue
        infos[layer.name] = _LayerInfo(layer.name, kind, in_layouts, out_layouts, in_shapes, out_shapes)
        order.append(layer.name)
        if metrics.mac_counter(layer) is not None:
            if kind in (KIND_BARRIER, KIND_INPUT):
                # Inputs fixed, output fixed: its cost does not change with any group.
                constant_macs += sum(metrics.mac_counter(layer)(layer, i, o)
                                     for i, o in zip(in_shapes[:1], out_shapes[:1]))
            else:
                mac_layers.append((layer, in_shapes[0], out_shapes[0]))

    for output in model.outputs:
        history = output._keras_history  # noqa: SLF001
        for space in layouts[str(id(output))]:
            spaces.fix(space, f"reaches the model output '{history.layer.name}'")

    # Every split is known now: layouts from here on list leaves (unsplit spaces).
    for info in infos.values():
        info.in_layouts = [spaces.expand(layout) for layout in info.in_layouts]
        info.out_layouts = [spaces.expand(layout) for layout in info.out_layouts]
    # Report the barriers that stop the channels of some producer (not those on fixed paths only).
    with_producer = {leaf for space, origin in enumerate(spaces.origin) if origin for leaf in spaces.leaves(space)}
    barriers = [barrier for barrier, inputs in barrier_inputs
                if any(leaf in with_producer for space in inputs for leaf in spaces.leaves(space))]
    return ChannelAnalysis(model, spaces, infos, order, barriers, int(constant_macs), mac_layers,
                           successors, pads, pad_widths)
