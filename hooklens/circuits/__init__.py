"""Circuit discovery with EAP-IG 2.0's public API (hannamw/EAP-IG), so EAP-IG / MIB code runs after swapping
`eap.graph` / `eap.attribute` / `eap.evaluate` imports for `hooklens.circuits`:

- `Graph` (and its node / edge classes): the model's computational graph, circuit selection, JSON / .pt files,
  drawing (hooklens.circuits.graph, .drawing);
- `attribute` (EAP, EAP-IG-inputs, EAP-IG-activations, clean-corrupted, exact) (hooklens.circuits.attribute);
- `evaluate_graph`, `evaluate_graphs` (many circuits at once), `evaluate_baseline` (hooklens.circuits.evaluate);
- `exact`: exact edge patching, many edges per forward (hooklens.circuits.exact);
- `faithfulness_curve`, `mib_scores`: MIB's faithfulness curve, CPR and CMD (hooklens.circuits.faithfulness);
- `IOIDataset`, `logit_diff`: IOI data in EAP-IG's batch format and its metric (hooklens.circuits.ioi).
"""
# `attribute` is bound here on purpose: it is also a submodule's name, and importing a submodule sets the package
# attribute to the module; importing the function in __init__ keeps `from hooklens.circuits import attribute` the
# function however the submodules are imported later.
from hooklens.circuits.attribute import attribute
from hooklens.circuits.evaluate import evaluate_baseline, evaluate_graph, evaluate_graphs
from hooklens.circuits.exact import exact
from hooklens.circuits.faithfulness import (
    MIB_KS,
    FaithfulnessCurve,
    MIBScores,
    curve_areas,
    faithfulness_curve,
    faithfulness_curves,
    mib_scores,
)
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
from hooklens.circuits.interventions import tokenize_plus
from hooklens.circuits.ioi import IOIDataset, collate_EAP, logit_diff

__all__ = ["AttentionNode", "Edge", "Graph", "GraphConfig", "InputNode", "LogitNode", "MLPNode", "Node",
           "IOIDataset", "collate_EAP", "logit_diff", "attribute", "evaluate_graph", "evaluate_graphs",
           "evaluate_baseline", "tokenize_plus", "exact", "MIB_KS", "FaithfulnessCurve", "MIBScores", "curve_areas",
           "faithfulness_curve", "faithfulness_curves", "mib_scores"]
