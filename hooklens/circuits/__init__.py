"""Circuit discovery with EAP-IG 2.0's public API (hannamw/EAP-IG): the model's computational `Graph`, and an
IOI dataset generator with EAP-IG-shaped batches and metrics."""
from hooklens.circuits.graph import (
    AttentionNode,
    Edge,
    Graph,
    GraphConfig,
    InputNode,
    LogitNode,
    MLPNode,
    Node,
)

__all__ = ["AttentionNode", "Edge", "Graph", "GraphConfig", "InputNode", "LogitNode", "MLPNode", "Node"]
