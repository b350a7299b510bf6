"""The computational graph of a circuit, with EAP-IG 2.0's public API (hannamw/EAP-IG, `eap/graph.py`).

Nodes are the residual-stream writers and readers of a GPT-2-style model: `input` (the embeddings), one node per
attention head `a{layer}.h{head}`, one per MLP `m{layer}`, and `logits`. An edge connects a sender (every node
but `logits`) to every receiver that reads the residual stream after the sender wrote it; an attention receiver
reads through three inputs, so it has three edges per sender, named `a0.h1->a2.h3<q>` (`<k>`, `<v>`).

Everything the attribution and evaluation code needs lives in dense tensors in EAP-IG's layout:

- forward (sender) index: `input` = 0, then per layer `a{l}.h0 .. a{l}.h{H-1}`, `m{l}`, i.e. head h of layer l is
  `1 + l*(H+1) + h` and `m{l}` is `1 + l*(H+1) + H`; `n_forward = 1 + L*(H+1)`.
- backward (receiver input) index: per layer the H q-inputs, the H k-inputs, the H v-inputs, then `m{l}`, i.e.
  `l*(3H+1) + {q:0,k:1,v:2}*H + h` and `l*(3H+1) + 3H`; `logits` is the last column; `n_backward = L*(3H+1) + 1`.
- `scores`, `in_graph`, `real_edge_mask`: `[n_forward, n_backward]`; `nodes_in_graph` (and `nodes_scores`):
  `[n_forward]`; `neurons_in_graph` / `neurons_scores`: `[n_forward, d_model]`.

Node and Edge objects are views: their `score` / `in_graph` read and write those tensors, so code may use either.
Files written by `to_json` / `to_pt` load in EAP-IG and vice versa.
"""
from __future__ import annotations

import heapq
import json
import math
import operator
import os
from typing import Any, Dict, List, Literal, Optional, Set, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Graph", "GraphConfig", "Node", "InputNode", "AttentionNode", "MLPNode", "LogitNode", "Edge"]

_QKV = "qkv"
# The cfg fields a graph needs; EAP-IG keeps exactly these when built from a model or config.
_REQUIRED_CFG_KEYS = ("n_layers", "n_heads", "parallel_attn_mlp", "d_model")


def _cfg_get(cfg: Any, key: str) -> Any:
    # EAP-IG's index helpers read the config both as `cfg.key` and `cfg['key']`; accept dicts and config objects.
    if isinstance(cfg, dict):
        return cfg[key]
    return getattr(cfg, key)


def _as_count(n: Any, where: str, name: str) -> int:
    # Python, NumPy and 0-d torch integers are all fine (MIB passes int(k * n_edges)); floats and bools are not.
    if isinstance(n, bool):
        raise ValueError(f"{where}: {name} must be an integer, got {n!r}")
    try:
        return operator.index(n)
    except TypeError:
        raise ValueError(f"{where}: {name} must be an integer, got {n!r} (e.g. int(k * n_edges))") from None


class GraphConfig(dict):
    """The model facts a graph depends on (n_layers, n_heads, parallel_attn_mlp, d_model, ...): a dict whose keys
    are also attributes, as in EAP-IG, so `graph.cfg['n_heads']` and `graph.cfg.n_heads` both work."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__ = self


class Node:
    """A model component in the graph. `in_hook` is the hook on the component's input, `out_hook` the hook on its
    output, `index` the slice of that hook's activation that belongs to this node."""

    name: str
    layer: int
    in_hook: str
    out_hook: str
    index: Tuple
    parents: Set["Node"]
    parent_edges: Set["Edge"]
    children: Set["Node"]
    child_edges: Set["Edge"]
    qkv_inputs: Optional[List[str]]

    def __init__(self, name: str, layer: int, in_hook: str, out_hook: str, index: Any, graph: "Graph",
                 qkv_inputs: Optional[List[str]] = None):
        self.name = name
        self.layer = layer
        self.in_hook = in_hook
        self.out_hook = out_hook
        self.index = index
        self.graph = graph
        self.parents = set()
        self.children = set()
        self.parent_edges = set()
        self.child_edges = set()
        self.qkv_inputs = qkv_inputs
        # Cached so that per-node property access in Python loops (greedy search, JSON) skips name parsing.
        self._forward = Graph._forward_index(graph.cfg, name, attn_slice=False)

    def __repr__(self):
        return f"Node({self.name}, in_graph: {self.in_graph})"

    def __hash__(self):
        return hash(self.name)

    # A node's state lives in the graph's tensors, indexed by the node's forward index.
    @property
    def in_graph(self):
        return self.graph.nodes_in_graph[self._forward]

    @in_graph.setter
    def in_graph(self, value):
        self.graph.nodes_in_graph[self._forward] = value

    @property
    def score(self):
        if self.graph.nodes_scores is None:
            return None
        return self.graph.nodes_scores[self._forward]

    @score.setter
    def score(self, value):
        if self.graph.nodes_scores is None:
            raise RuntimeError(f"Cannot set the score of node {self.name}: the graph has no node scores; build it "
                               "with Graph.from_model(..., node_scores=True)")
        self.graph.nodes_scores[self._forward] = value

    @property
    def neurons(self):
        if self.graph.neurons_in_graph is None:
            return None
        return self.graph.neurons_in_graph[self._forward]

    @neurons.setter
    def neurons(self, value):
        if self.graph.neurons_in_graph is None:
            raise RuntimeError(f"Cannot set the neurons of node {self.name}: the graph is not neuron-level; build it "
                               "with Graph.from_model(..., neuron_level=True)")
        self.graph.neurons_in_graph[self._forward] = value

    @property
    def neurons_scores(self):
        if self.graph.neurons_scores is None:
            return None
        return self.graph.neurons_scores[self._forward]

    @neurons_scores.setter
    def neurons_scores(self, value):
        if self.graph.neurons_scores is None:
            raise RuntimeError(f"Cannot set the neuron scores of node {self.name}: the graph is not neuron-level; "
                               "build it with Graph.from_model(..., neuron_level=True)")
        self.graph.neurons_scores[self._forward] = value


class LogitNode(Node):
    """The unembedding's input (the final residual stream); it sends nothing, so it has no forward row."""

    def __init__(self, n_layers: int, graph: "Graph"):
        super().__init__("logits", n_layers - 1, f"blocks.{n_layers - 1}.hook_resid_post", "", slice(None), graph)

    @property
    def in_graph(self):
        return True

    @in_graph.setter
    def in_graph(self, value):
        raise ValueError("Cannot set in_graph for the logits node: it is always in the graph")

    @property
    def score(self):
        # The logits have no forward row, hence no node score (EAP-IG would index past the end here).
        return None

    @score.setter
    def score(self, value):
        raise ValueError("The logits node has no score (only sender nodes are scored)")


class MLPNode(Node):
    def __init__(self, layer: int, graph: "Graph"):
        super().__init__(f"m{layer}", layer, f"blocks.{layer}.hook_mlp_in", f"blocks.{layer}.hook_mlp_out",
                         slice(None), graph)


class AttentionNode(Node):
    head: int

    def __init__(self, layer: int, head: int, graph: "Graph"):
        self.head = head
        super().__init__(f"a{layer}.h{head}", layer, f"blocks.{layer}.hook_attn_in",
                         f"blocks.{layer}.attn.hook_result", (slice(None), slice(None), head), graph,
                         qkv_inputs=[f"blocks.{layer}.hook_{letter}_input" for letter in _QKV])


class InputNode(Node):
    def __init__(self, graph: "Graph"):
        super().__init__("input", 0, "", "hook_embed", slice(None), graph)


class Edge:
    """A sender -> receiver edge, named `PARENT->CHILD` or `PARENT->CHILD<q|k|v>` for attention receivers.

    `hook` / `index` locate the receiver input the edge feeds; `matrix_index` is its (forward, backward) cell in
    the graph's tensors, through which `score` and `in_graph` are read and written.
    """

    name: str
    parent: Node
    child: Node
    hook: str
    index: Any
    graph: "Graph"

    def __init__(self, graph: "Graph", parent: Node, child: Node, qkv: Optional[Literal["q", "k", "v"]] = None):
        self.graph = graph
        self.name = f"{parent.name}->{child.name}" if qkv is None else f"{parent.name}->{child.name}<{qkv}>"
        self.parent = parent
        self.child = child
        self.qkv = qkv
        if isinstance(child, AttentionNode):
            if qkv is None:
                raise ValueError(f"Edge({self.name}): an edge into an attention head needs qkv='q', 'k' or 'v'")
            self.hook = f"blocks.{child.layer}.hook_{qkv}_input"
            self.index = (slice(None), slice(None), child.head)
        else:
            if qkv is not None:
                raise ValueError(f"Edge({self.name}): qkv applies only to edges into attention heads")
            self.index = child.index
            self.hook = child.in_hook
        backward = Graph._backward_index(graph.cfg, child.name, qkv, attn_slice=False)
        # logits' backward index is -1 in EAP-IG's API; the stored cell uses the same (negative) column.
        self.matrix_index = (parent._forward, backward)

    def __repr__(self):
        return f"Edge({self.name}, score: {self.score}, in_graph: {self.in_graph})"

    def __hash__(self):
        return hash(self.name)

    @property
    def score(self):
        return self.graph.scores[self.matrix_index]

    @score.setter
    def score(self, value):
        self.graph.scores[self.matrix_index] = value

    @property
    def in_graph(self):
        return self.graph.in_graph[self.matrix_index]

    @in_graph.setter
    def in_graph(self, value):
        self.graph.in_graph[self.matrix_index] = value


class Graph:
    """A model's computational graph over heads, MLPs, input and logits, with edge scores and a circuit mask.

    Build it with `Graph.from_model(model)` (or a config, or a dict with n_layers, n_heads, parallel_attn_mlp,
    d_model). Attributes, as in EAP-IG: `nodes` / `edges` (name -> object, in EAP-IG's order), `n_forward`,
    `n_backward`, `scores`, `in_graph`, `real_edge_mask`, `forward_to_backward` (`[n_forward, n_backward]`, which
    backward columns are a sender's own inputs), `nodes_in_graph`, `nodes_scores`, `neurons_in_graph`,
    `neurons_scores`, `cfg`.
    """

    nodes: Dict[str, Node]
    edges: Dict[str, Edge]
    n_forward: int
    n_backward: int
    scores: Tensor
    in_graph: Tensor
    neurons_scores: Optional[Tensor]
    neurons_in_graph: Optional[Tensor]
    nodes_scores: Optional[Tensor]
    nodes_in_graph: Tensor
    forward_to_backward: Tensor
    real_edge_mask: Tensor
    cfg: GraphConfig

    def __init__(self):
        self.nodes = {}
        self.edges = {}
        self.n_forward = 0
        self.n_backward = 0

    # ------------------------------------------------------------------------------------------------ indices
    @classmethod
    def _n_forward(cls, cfg) -> int:
        return 1 + _cfg_get(cfg, "n_layers") * (_cfg_get(cfg, "n_heads") + 1)

    @classmethod
    def _n_backward(cls, cfg) -> int:
        return _cfg_get(cfg, "n_layers") * (3 * _cfg_get(cfg, "n_heads") + 1) + 1

    @staticmethod
    def _parse_node_name(cfg, node_name: str) -> Tuple[str, int, int]:
        """('input'|'logits'|'m'|'a', layer, head) for a node name, with a clear error for names that don't exist."""
        if node_name in ("input", "logits"):
            return node_name, -1, -1
        n_layers, n_heads = _cfg_get(cfg, "n_layers"), _cfg_get(cfg, "n_heads")
        try:
            if node_name[0] == "m":
                layer, head = int(node_name[1:]), -1
            elif node_name[0] == "a":
                layer_part, head_part = node_name.split(".")
                if head_part[0] != "h":
                    raise ValueError
                layer, head = int(layer_part[1:]), int(head_part[1:])
            else:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"Invalid node name {node_name!r}: expected 'input', 'logits', 'm{{layer}}' or "
                             "'a{layer}.h{head}'") from None
        if not 0 <= layer < n_layers or (node_name[0] == "a" and not 0 <= head < n_heads):
            raise ValueError(f"Node {node_name!r} does not exist in a graph with {n_layers} layers and {n_heads} "
                             "heads per layer")
        return node_name[0], layer, head

    @classmethod
    def _forward_index(cls, cfg, node_name: str, attn_slice: bool = False) -> Union[int, slice]:
        """The forward (sender) row of a node; for heads with attn_slice=True, the slice of its layer's heads."""
        kind, layer, head = cls._parse_node_name(cfg, node_name)
        n_heads = _cfg_get(cfg, "n_heads")
        if kind == "input":
            return 0
        if kind == "logits":
            return cls._n_forward(cfg)
        start = 1 + layer * (n_heads + 1)
        if kind == "m":
            return start + n_heads
        return slice(start, start + n_heads) if attn_slice else start + head

    def forward_index(self, node: Node, attn_slice: bool = True) -> Union[int, slice]:
        return Graph._forward_index(self.cfg, node.name, attn_slice)

    @classmethod
    def _backward_index(cls, cfg, node_name: str, qkv: Optional[str] = None,
                        attn_slice: bool = False) -> Union[int, slice]:
        """The backward (receiver input) column of a node; attention heads need qkv, and with attn_slice=True give
        the slice of their layer's heads for that input."""
        kind, layer, head = cls._parse_node_name(cfg, node_name)
        n_heads = _cfg_get(cfg, "n_heads")
        if kind == "input":
            raise ValueError("The input node receives no edges, so it has no backward index")
        if kind == "logits":
            return -1
        start = layer * (3 * n_heads + 1)
        if kind == "m":
            return start + 3 * n_heads
        if qkv is None or qkv not in ("q", "k", "v"):
            raise ValueError(f"Attention node {node_name!r} needs qkv='q', 'k' or 'v' for its backward index, "
                             f"got {qkv!r}")
        i = start + _QKV.index(qkv) * n_heads
        return slice(i, i + n_heads) if attn_slice else i + head

    def backward_index(self, node: Node, qkv: Optional[str] = None, attn_slice: bool = True) -> Union[int, slice]:
        return Graph._backward_index(self.cfg, node.name, qkv, attn_slice)

    def prev_index(self, node: Node) -> int:
        """Forward rows `[:prev_index(node)]` are exactly the senders whose outputs reach `node`'s input."""
        if isinstance(node, InputNode):
            return 0
        if isinstance(node, LogitNode):
            return self.n_forward
        start = 1 + node.layer * (self.cfg["n_heads"] + 1)
        if isinstance(node, MLPNode) and not self.cfg["parallel_attn_mlp"]:
            return start + self.cfg["n_heads"]  # a sequential MLP also reads its own layer's heads
        if isinstance(node, (MLPNode, AttentionNode)):
            return start
        raise ValueError(f"Invalid node: {node} of type {type(node)}")

    def _backward_prev_index(self) -> Tensor:
        """`[n_backward]`: for each receiver column, how many forward rows feed it (EAP-IG's prev_index)."""
        n_layers, n_heads = self.cfg["n_layers"], self.cfg["n_heads"]
        layer_of_column = torch.arange(n_layers).repeat_interleave(3 * n_heads + 1)  # [n_backward - 1]
        prev = 1 + layer_of_column * (n_heads + 1)
        if not self.cfg["parallel_attn_mlp"]:
            is_mlp = (torch.arange(n_layers * (3 * n_heads + 1)) % (3 * n_heads + 1)) == 3 * n_heads
            prev = prev + is_mlp * n_heads
        return torch.cat([prev, torch.tensor([self.n_forward])])

    def get_dst_nodes(self) -> List[str]:
        """Receiver names in backward-column order: per layer `a{l}.h{h}<q>` for all heads, then <k>, <v>, `m{l}`;
        then `logits`."""
        names = []
        for layer in range(self.cfg["n_layers"]):
            for letter in _QKV:
                names.extend(f"a{layer}.h{head}<{letter}>" for head in range(self.cfg["n_heads"]))
            names.append(f"m{layer}")
        names.append("logits")
        return names

    # ---------------------------------------------------------------------------------------------- building
    def add_edge(self, parent: Node, child: Node, qkv: Optional[Literal["q", "k", "v"]] = None):
        edge = Edge(self, parent, child, qkv)
        self.real_edge_mask[edge.matrix_index] = True
        self.edges[edge.name] = edge
        parent.children.add(child)
        parent.child_edges.add(edge)
        child.parents.add(parent)
        child.parent_edges.add(edge)

    @classmethod
    def from_model(cls, model_or_config: Any, neuron_level: bool = False, node_scores: bool = False) -> "Graph":
        """A graph for a HookedTransformer (hooklens or TransformerLens), its config, or a dict holding n_layers,
        n_heads, parallel_attn_mlp and d_model (a dict's other keys are kept in `graph.cfg`).

        neuron_level: add `neurons_in_graph` / `neurons_scores` (`[n_forward, d_model]`, scores NaN = unscored).
        node_scores: add `nodes_scores` (`[n_forward]`, NaN = unscored). Unscored nodes / neurons stay in the graph
        under node- / neuron-level topn and threshold.
        """
        graph = cls()
        graph.cfg = cls._config_of(model_or_config)
        graph._allocate(neuron_level, node_scores)
        graph._add_nodes_and_edges()
        return graph

    @staticmethod
    def _config_of(model_or_config: Any) -> "GraphConfig":
        """The graph's config from a model, its config or a dict, checked."""
        config = GraphConfig()
        if isinstance(model_or_config, dict):
            missing = [key for key in _REQUIRED_CFG_KEYS if key not in model_or_config]
            if missing:
                raise ValueError(f"Graph.from_model: the config dict lacks {missing}; it needs "
                                 f"{list(_REQUIRED_CFG_KEYS)}")
            config.update(model_or_config)
        else:
            # A model carries its config in `.cfg`; a config object has the fields itself.
            cfg = getattr(model_or_config, "cfg", model_or_config)
            if not all(hasattr(cfg, key) for key in ("n_layers", "n_heads", "d_model")):
                raise ValueError(f"Graph.from_model needs a HookedTransformer, its config, or a dict with "
                                 f"{list(_REQUIRED_CFG_KEYS)}; got {type(model_or_config).__name__}")
            if getattr(cfg, "attn_only", False):
                raise ValueError("Graph.from_model: the model is attention-only, but EAP-IG's graph has an MLP node "
                                 "per layer; use a model with MLPs")
            config.update({"n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                           "parallel_attn_mlp": bool(getattr(cfg, "parallel_attn_mlp", False)),
                           "d_model": cfg.d_model})
        n_layers, n_heads = config["n_layers"], config["n_heads"]
        if not (isinstance(n_layers, int) and isinstance(n_heads, int) and n_layers >= 1 and n_heads >= 1):
            raise ValueError(f"Graph.from_model: n_layers and n_heads must be positive integers, got "
                             f"n_layers={n_layers!r}, n_heads={n_heads!r}")
        return config

    def _allocate(self, neuron_level: bool, node_scores: bool) -> None:
        """The graph's [n_forward, n_backward] tensors (and per-node / per-neuron ones when asked for)."""
        graph, cls = self, type(self)
        n_layers, n_heads = graph.cfg["n_layers"], graph.cfg["n_heads"]
        graph.n_forward = cls._n_forward(graph.cfg)
        graph.n_backward = cls._n_backward(graph.cfg)
        shape = (graph.n_forward, graph.n_backward)
        graph.scores = torch.zeros(shape)
        graph.in_graph = torch.zeros(shape, dtype=torch.bool)
        graph.real_edge_mask = torch.zeros(shape, dtype=torch.bool)
        graph.nodes_in_graph = torch.zeros(graph.n_forward, dtype=torch.bool)
        graph.nodes_scores = torch.full((graph.n_forward,), torch.nan) if node_scores else None
        if neuron_level:
            graph.neurons_in_graph = torch.zeros((graph.n_forward, graph.cfg["d_model"]), dtype=torch.bool)
            graph.neurons_scores = torch.full((graph.n_forward, graph.cfg["d_model"]), torch.nan)
        else:
            graph.neurons_in_graph = None
            graph.neurons_scores = None

        # forward_to_backward: a head's row marks its own q/k/v columns, an MLP's row its own column.
        graph.forward_to_backward = torch.zeros(shape, dtype=torch.bool)
        layers = torch.arange(n_layers)
        heads = torch.arange(n_heads)
        head_rows = (1 + layers[:, None] * (n_heads + 1) + heads[None, :]).reshape(-1)  # [L*H]
        for qkv_i in range(3):
            head_cols = (layers[:, None] * (3 * n_heads + 1) + qkv_i * n_heads + heads[None, :]).reshape(-1)  # [L*H]
            graph.forward_to_backward[head_rows, head_cols] = True
        graph.forward_to_backward[1 + layers * (n_heads + 1) + n_heads, layers * (3 * n_heads + 1) + 3 * n_heads] = True

    def _add_nodes_and_edges(self) -> None:
        """Nodes and edges in EAP-IG's insertion order (to_json writes them in this order)."""
        graph = self
        n_layers, n_heads = graph.cfg["n_layers"], graph.cfg["n_heads"]
        input_node = InputNode(graph)
        graph.nodes[input_node.name] = input_node
        residual_stream: List[Node] = [input_node]
        for layer in range(n_layers):
            attn_nodes = [AttentionNode(layer, head, graph) for head in range(n_heads)]
            mlp_node = MLPNode(layer, graph)
            for attn_node in attn_nodes:
                graph.nodes[attn_node.name] = attn_node
            graph.nodes[mlp_node.name] = mlp_node
            for node in residual_stream:
                for attn_node in attn_nodes:
                    for letter in _QKV:
                        graph.add_edge(node, attn_node, qkv=letter)
                if graph.cfg["parallel_attn_mlp"]:
                    graph.add_edge(node, mlp_node)
            residual_stream += attn_nodes
            if not graph.cfg["parallel_attn_mlp"]:
                for node in residual_stream:
                    graph.add_edge(node, mlp_node)
            residual_stream.append(mlp_node)
        logit_node = LogitNode(n_layers, graph)
        for node in residual_stream:
            graph.add_edge(node, logit_node)
        graph.nodes[logit_node.name] = logit_node

    # -------------------------------------------------------------------------------------------- counting
    def weighted_edge_count(self) -> float:
        """Edges in the graph, each weighted by the fraction of its sender's neurons in the graph (if neuron-level)."""
        if self.neurons_in_graph is not None:
            neuron_fraction = self.neurons_in_graph.float().sum(1) / self.cfg["d_model"]  # [n_forward]
            return float((self.in_graph.float().sum(1) * neuron_fraction).sum())
        return float(self.count_included_edges())

    def count_included_edges(self) -> int:
        return int(self.in_graph.sum())

    def count_included_nodes(self) -> int:
        return int(self.nodes_in_graph.sum())

    def count_included_neurons(self) -> int:
        if self.neurons_in_graph is None:
            raise ValueError("count_included_neurons: the graph is not neuron-level (Graph.from_model(..., "
                             "neuron_level=True))")
        return int(self.neurons_in_graph.sum())

    # ------------------------------------------------------------------------------------------ selection
    def reset(self, empty: bool = True):
        """Empty the graph (empty=True) or put every real edge, every node and every neuron in it."""
        if empty:
            self.nodes_in_graph[:] = False
            self.in_graph[:] = False
            if self.neurons_in_graph is not None:
                self.neurons_in_graph[:] = False
        else:
            self.nodes_in_graph[:] = True
            self.in_graph[:] = self.real_edge_mask
            if self.neurons_in_graph is not None:
                self.neurons_in_graph[:] = True

    def _nodes_with_ingoing(self) -> Tensor:
        """`[n_forward]`: senders with an in-graph edge into any of their inputs (the input node counts as fed)."""
        fed_columns = self.in_graph.any(dim=0)  # [n_backward]
        fed = (self.forward_to_backward & fed_columns[None, :]).any(dim=1)
        fed[0] = True
        return fed

    def _add_connected_nodes(self):
        # After an edge-level selection from an empty graph: a node joins if it both receives and sends an edge.
        self.nodes_in_graph |= self.in_graph.any(dim=1) & self._nodes_with_ingoing()

    def _add_node_rows(self):
        # After a node/neuron-level selection from an empty graph: every real outgoing edge of an included node.
        self.in_graph |= self.nodes_in_graph[:, None] & self.real_edge_mask

    @staticmethod
    def _check_level(level: str):
        if level not in ("edge", "node", "neuron"):
            raise ValueError(f"Invalid level {level!r}: expected 'edge', 'node' or 'neuron'")

    def _require_scores(self, level: str) -> Tensor:
        if level == "node":
            if self.nodes_scores is None:
                raise ValueError("level='node' needs node scores: build the graph with Graph.from_model(..., "
                                 "node_scores=True) and attribute nodes")
            return self.nodes_scores
        if level == "neuron":
            if self.neurons_scores is None:
                raise ValueError("level='neuron' needs neuron scores: build the graph with Graph.from_model(..., "
                                 "neuron_level=True) and attribute neurons")
            return self.neurons_scores
        if torch.isnan(self.scores[self.real_edge_mask]).any():
            raise ValueError("Edge scores contain NaN; attribution produced invalid scores (check the metric and "
                             "the data for NaN/inf logits)")
        return self.scores

    def apply_threshold(self, threshold: float, absolute: bool = True, reset: bool = True,
                        level: Literal["edge", "node", "neuron"] = "edge", prune: bool = True):
        """Keep the edges / nodes / neurons whose score (absolute value if `absolute`) is >= threshold. Unscored
        (NaN) nodes and neurons are always kept. With reset, the graph is emptied first and the nodes (edge level)
        or outgoing edges (node / neuron level) of the selection are added; with prune, `prune()` runs last."""
        self._check_level(level)
        threshold = float(threshold)
        scores = self._require_scores(level)
        if reset:
            self.reset()
        values = scores.abs() if absolute else scores
        if level == "edge":
            self.in_graph[:] = (values >= threshold) & self.real_edge_mask
            if reset:
                self._add_connected_nodes()
        else:
            included = (values >= threshold) | torch.isnan(scores)
            if level == "neuron":
                self.neurons_in_graph[:] = included
                if reset:
                    self.nodes_in_graph |= self.neurons_in_graph.any(dim=1)
                    self._add_node_rows()
            else:
                self.nodes_in_graph[:] = included
                if reset:
                    self._add_node_rows()
        if prune:
            self.prune()

    @staticmethod
    def _top_flat(values: Tensor, eligible: Tensor, n: int) -> Tensor:
        """Flat indices of the n largest eligible values. Ties are broken by position (the lower flat index, i.e.
        the lower forward row, then the lower backward column, wins), so the selection is deterministic; EAP-IG's
        unstable argsort leaves ties in an unspecified order."""
        keyed = torch.where(eligible, values, torch.full_like(values, -math.inf)).reshape(-1)
        order = torch.sort(keyed, descending=True, stable=True).indices
        return order[:n]

    def apply_topn(self, n: int, absolute: bool = True, level: Literal["edge", "node", "neuron"] = "edge",
                   reset: bool = True, prune: bool = True):
        """Keep the n highest-scoring edges / nodes / neurons (by absolute score if `absolute`). Ties go to the
        lower index in EAP-IG's layout (row-major `[n_forward, n_backward]` for edges). Unscored (NaN) nodes and
        neurons are always kept, on top of the n. reset / prune as in `apply_threshold`.

        Node / neuron level with reset adds each selected node's *real* outgoing edges (EAP-IG also sets the
        non-edge cells of its row, e.g. m3->m1, which then inflate count_included_edges)."""
        self._check_level(level)
        scores = self._require_scores(level)
        if level == "edge":
            eligible = self.real_edge_mask
        else:
            eligible = ~torch.isnan(scores)
        n_eligible = int(eligible.sum())
        n = _as_count(n, "apply_topn", "n")
        if not 0 <= n <= n_eligible:
            what = {"edge": "edges", "node": "scored nodes", "neuron": "scored neurons"}[level]
            raise ValueError(f"apply_topn: n must be an integer in [0, {n_eligible}] (the number of {what}), got {n!r}")
        if reset:
            self.reset()
        values = scores.abs() if absolute else scores
        selected = torch.zeros(scores.numel(), dtype=torch.bool)
        selected[self._top_flat(values, eligible, n)] = True
        selected = selected.view_as(scores)
        if level == "edge":
            self.in_graph[:] = selected
            if reset:
                self._add_connected_nodes()
        elif level == "node":
            self.nodes_in_graph[:] = selected | ~eligible
            if reset:
                self._add_node_rows()
        else:
            self.neurons_in_graph[:] = selected | ~eligible
            if reset:
                self.nodes_in_graph |= self.neurons_in_graph.any(dim=1)
                self._add_node_rows()
        if prune:
            self.prune()

    def apply_greedy(self, n_edges: int, absolute: bool = True, reset: bool = True, prune: bool = True):
        """Grow a circuit from the logits: repeatedly add the highest-scoring edge whose receiver is already in the
        graph (adding its sender, whose own incoming edges then become candidates), n_edges times.

        Ties go to the edge that became a candidate first, then to the earlier edge in `graph.edges` order (the
        order EAP-IG's chain of stable merges yields).
        """
        n_edges = _as_count(n_edges, "apply_greedy", "n_edges")
        if not 0 <= n_edges <= len(self.edges):
            raise ValueError(f"apply_greedy: n_edges must be an integer in [0, {len(self.edges)}] (the number of "
                             f"edges), got {n_edges!r}")
        self._require_scores("edge")
        if reset:
            self.nodes_in_graph[:] = False
            self.in_graph[:] = False
        values = self.scores.abs() if absolute else self.scores
        values_list = values.tolist()  # one host copy, read per edge below
        edge_list = list(self.edges.values())
        order = {edge.name: i for i, edge in enumerate(edge_list)}
        node_in = self.nodes_in_graph.tolist()

        def child_in_graph(edge: Edge) -> bool:
            return isinstance(edge.child, LogitNode) or node_in[edge.child._forward]

        def key(edge: Edge, batch: int):
            f, b = edge.matrix_index
            return (-values_list[f][b], batch, order[edge.name])

        # a heap entry: (-score, candidacy batch, edge order, edge position)
        heap = [key(edge, 0) + (i,) for i, edge in enumerate(edge_list) if child_in_graph(edge)]
        heapq.heapify(heap)
        batch = 0
        for _ in range(n_edges):
            if not heap:
                raise ValueError(f"apply_greedy: only {self.count_included_edges()} edges are reachable from the "
                                 f"graph's current nodes, fewer than n_edges={n_edges}")
            edge = edge_list[heapq.heappop(heap)[3]]
            self.in_graph[edge.matrix_index] = True
            parent = edge.parent
            if not node_in[parent._forward]:
                node_in[parent._forward] = True
                self.nodes_in_graph[parent._forward] = True
                batch += 1
                for parent_edge in parent.parent_edges:
                    heapq.heappush(heap, key(parent_edge, batch) + (order[parent_edge.name],))
        if prune:
            self.prune()

    def prune(self):
        """Make the circuit connected: repeatedly keep only the nodes that both receive and send an in-graph edge
        (the input node counts as receiving), and only the edges whose sender and receiver are kept, until nothing
        changes. Never adds edges. On neuron-level graphs, nodes without neurons go first and removed nodes lose
        their neurons."""
        has_neurons = self.neurons_in_graph.any(dim=1) if self.neurons_in_graph is not None else None
        if has_neurons is not None:
            self.nodes_in_graph &= has_neurons
        # Each pass removes at least one node or edge or stops; in practice a handful of passes (<= 2 per layer).
        while True:
            old_nodes, old_edges = self.nodes_in_graph.clone(), self.in_graph.clone()
            nodes = self.in_graph.any(dim=1) & self._nodes_with_ingoing()
            if has_neurons is not None:
                nodes &= has_neurons
            self.nodes_in_graph[:] = nodes
            receivers = (self.forward_to_backward & nodes[:, None]).any(dim=0)  # [n_backward]
            receivers[-1] = True  # the logits are always in the graph
            self.in_graph &= nodes[:, None] & receivers[None, :]
            if torch.equal(old_nodes, self.nodes_in_graph) and torch.equal(old_edges, self.in_graph):
                break
        if self.neurons_in_graph is not None:
            self.neurons_in_graph &= self.nodes_in_graph[:, None]

    # ---------------------------------------------------------------------------------------------- files
    def to_json(self, filename: Union[str, os.PathLike]):
        """Write EAP-IG's JSON: {'cfg': {...}, 'nodes': {name: {'in_graph', ['score'], ['neurons',
        'neurons_scores']}}, 'edges': {name: {'score', 'in_graph'}}}, in `graph.nodes` / `graph.edges` order."""
        nodes_in = self.nodes_in_graph.tolist()
        node_scores = self.nodes_scores.tolist() if self.nodes_scores is not None else None
        neurons = self.neurons_in_graph.tolist() if self.neurons_in_graph is not None else None
        neuron_scores = self.neurons_scores.tolist() if self.neurons_scores is not None else None
        node_dict = {}
        for name, node in self.nodes.items():
            if isinstance(node, LogitNode):
                # the logits have no forward row: always in the graph, never scored
                node_dict[name] = {"in_graph": True}
                continue
            entry: Dict[str, Any] = {"in_graph": bool(nodes_in[node._forward])}
            if node_scores is not None:
                entry["score"] = float(node_scores[node._forward])
            if neurons is not None:
                entry["neurons"] = neurons[node._forward]
                entry["neurons_scores"] = neuron_scores[node._forward]
            node_dict[name] = entry
        scores, in_graph = self.scores.tolist(), self.in_graph.tolist()
        edge_dict = {}
        for name, edge in self.edges.items():
            f, b = edge.matrix_index
            edge_dict[name] = {"score": float(scores[f][b]), "in_graph": bool(in_graph[f][b])}
        with open(filename, "w") as file:
            json.dump({"cfg": dict(self.cfg), "nodes": node_dict, "edges": edge_dict}, file)

    @classmethod
    def from_json(cls, json_path: Union[str, os.PathLike]) -> "Graph":
        """Load a graph written by `to_json` (hooklens's or EAP-IG's). Node scores / neurons are present only if the
        file has them."""
        with open(json_path) as file:
            d = json.load(file)
        missing = [key for key in ("cfg", "nodes", "edges") if key not in d]
        if missing:
            raise ValueError(f"{json_path}: not a circuit graph JSON (missing keys {missing}; expected 'cfg', "
                             "'nodes', 'edges' as written by Graph.to_json)")
        g = cls.from_model(d["cfg"], neuron_level=True, node_scores=True)
        any_node_scores = any_neurons = any_neuron_scores = False
        for name, info in d["nodes"].items():
            if name == "logits":
                continue
            node = g._node_by_name(name, json_path)
            node.in_graph = bool(info["in_graph"])
            if "score" in info:
                any_node_scores = True
                node.score = info["score"]
            if "neurons" in info:
                any_neurons = True
                g.neurons_in_graph[node._forward] = torch.tensor(info["neurons"], dtype=torch.bool)
            if "neurons_scores" in info:
                any_neuron_scores = True
                g.neurons_scores[node._forward] = torch.tensor(info["neurons_scores"], dtype=torch.float32)
        if not any_node_scores:
            g.nodes_scores = None
        if not any_neurons:
            g.neurons_in_graph = None
        if not any_neuron_scores:
            g.neurons_scores = None
        for name, info in d["edges"].items():
            edge = g.edges.get(name)
            if edge is None:
                raise ValueError(f"{json_path}: edge {name!r} does not exist in a graph with cfg {d['cfg']}")
            g.scores[edge.matrix_index] = info["score"]
            g.in_graph[edge.matrix_index] = bool(info["in_graph"])
        return g

    def _node_by_name(self, name: str, source: Any) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise ValueError(f"{source}: node {name!r} does not exist in a graph with cfg {dict(self.cfg)}")
        return node

    def to_pt(self, filename: Union[str, os.PathLike]):
        """Save as EAP-IG's .pt dict (cfg, src_nodes, dst_nodes, edges_scores, edges_in_graph, nodes_in_graph, and
        nodes_scores / neurons_* when present). It holds only tensors, strings, numbers and lists, so it loads with
        `torch.load(..., weights_only=True)`."""
        src_nodes = [node.name for node in self.nodes.values() if not isinstance(node, LogitNode)]
        d = {"cfg": dict(self.cfg), "src_nodes": src_nodes, "dst_nodes": self.get_dst_nodes(),
             "edges_scores": self.scores, "edges_in_graph": self.in_graph, "nodes_in_graph": self.nodes_in_graph}
        if self.nodes_scores is not None:
            d["nodes_scores"] = self.nodes_scores
        if self.neurons_in_graph is not None:
            d["neurons_in_graph"] = self.neurons_in_graph
            d["neurons_scores"] = self.neurons_scores
        torch.save(d, filename)

    @classmethod
    def from_pt(cls, pt_path: Union[str, os.PathLike]) -> "Graph":
        """Load a graph saved by `to_pt` (hooklens's or EAP-IG's); read with weights_only=True (no pickled code)."""
        d = torch.load(pt_path, map_location="cpu", weights_only=True)
        required = ["cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph"]
        missing = [key for key in required if key not in d]
        if missing:
            raise ValueError(f"{pt_path}: not a circuit graph file (missing keys {missing}; written by Graph.to_pt?)")
        g = cls.from_model(d["cfg"])
        expected = (g.n_forward, g.n_backward)
        for key in ("edges_scores", "edges_in_graph"):
            if tuple(d[key].shape) != expected:
                raise ValueError(f"{pt_path}: {key} has shape {tuple(d[key].shape)}, but the cfg's graph is "
                                 f"{expected}")
        if list(d["dst_nodes"]) != g.get_dst_nodes() or len(d["src_nodes"]) != g.n_forward:
            raise ValueError(f"{pt_path}: src_nodes/dst_nodes do not match EAP-IG's layout for cfg {d['cfg']}")
        g.in_graph[:] = d["edges_in_graph"].bool()
        g.scores[:] = d["edges_scores"]
        g.nodes_in_graph[:] = d["nodes_in_graph"].bool()
        if "nodes_scores" in d:
            g.nodes_scores = d["nodes_scores"].float().clone()
        if "neurons_in_graph" in d:
            g.neurons_in_graph = d["neurons_in_graph"].bool().clone()
        if "neurons_scores" in d:
            g.neurons_scores = d["neurons_scores"].float().clone()
        return g

    # -------------------------------------------------------------------------------------------- drawing
    def draw(self, path: Optional[Union[str, os.PathLike]] = None, **kwargs):
        """Draw the circuit with matplotlib (see `hooklens.circuits.drawing.draw_graph` for the options); returns the
        Figure, also saved to `path` if given."""
        from hooklens.circuits.drawing import draw_graph

        return draw_graph(self, path, **kwargs)

    def to_image(self, filename: Union[str, os.PathLike], colorscheme: str = "Pastel2",
                 minimum_penwidth: float = 0.6, maximum_penwidth: float = 5.0, layout: str = "dot",
                 seed: Optional[int] = None):
        """EAP-IG's image export, drawn with matplotlib instead of graphviz: nodes filled from `colorscheme`,
        edges `minimum_penwidth`..`maximum_penwidth` wide by |score|. Only the layered ('dot') layout exists."""
        if layout != "dot":
            raise ValueError(f"to_image: only the layered layout 'dot' is available (matplotlib drawing), got "
                             f"{layout!r}")
        return self.draw(filename, node_colorscheme=colorscheme, min_width=minimum_penwidth,
                         max_width=maximum_penwidth, seed=seed)
