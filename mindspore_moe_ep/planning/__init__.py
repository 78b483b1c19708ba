"""Planning expert parallelism on a cluster: a cost model, checked against published
measurements (docs/scaling.md), and a planner that recommends the settings.

- :mod:`.cluster`: the cluster description (YAML, validated);
- :mod:`.routing`: where a token's experts land (distinct ranks and nodes, imbalance);
- :mod:`.cost`: bytes, times and memory of one layer step;
- :mod:`.planner`: rows for every EP size and batch, and the recommendation.

Pure Python (numpy, PyYAML): no mindspore import.
"""
from .cluster import ClusterSpec, load_cluster, save_cluster
from .cost import (BYTES_PER_ELEMENT, SEND_UNITS, Estimate, LayerShape, PlanOptions, estimate,
                   row_bytes, traffic_per_token)
from .planner import candidate_eps, make_plan, recommend
from .routing import Routing, destinations, imbalance_from_loads, miss_probability, receive_imbalance

__all__ = ["BYTES_PER_ELEMENT", "ClusterSpec", "Estimate", "LayerShape", "PlanOptions",
           "Routing", "SEND_UNITS", "candidate_eps", "destinations", "estimate",
           "imbalance_from_loads", "load_cluster", "make_plan", "miss_probability",
           "receive_imbalance", "recommend", "row_bytes", "save_cluster", "traffic_per_token"]
