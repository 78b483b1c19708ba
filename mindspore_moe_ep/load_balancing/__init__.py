"""Expert load balancing (docs/load_balancing.md).

- :mod:`.stats`: the expert-load window of a layer, summarised (``MoELayer.load_stats()``);
- :mod:`.placement`: where each expert and replica goes, from observed loads.

Pure Python and NumPy: nothing here imports MindSpore.
"""
from .placement import Placement, plan_placement, relocate_without_replicas, static_placement
from .stats import (chronological_window, load_stats_from_window, load_stats_to_json,
                    max_over_mean, rank_loads)

__all__ = ["Placement", "chronological_window", "load_stats_from_window", "load_stats_to_json",
           "max_over_mean", "plan_placement", "rank_loads", "relocate_without_replicas",
           "static_placement"]
