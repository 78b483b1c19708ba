"""Expert load balancing (docs/load_balancing.md).

- :mod:`.stats`: the expert-load window of a layer, summarised (``MoELayer.load_stats()``);
- :mod:`.placement`: where each expert and replica goes, from observed loads;
- :mod:`.replica_selection`: which replica serves each (token, expert) (a Cell);
- :mod:`.relocation`: moving the expert weights to a new placement.

Only :mod:`.replica_selection` imports MindSpore.
"""
from .placement import Placement, plan_placement, relocate_without_replicas, static_placement
from .relocation import (agree_on_placement, move_slot_arrays, optimizer_states,
                         relocation_sources)
from .stats import (chronological_window, load_stats_from_window, load_stats_to_json,
                    max_over_mean, rank_loads)

__all__ = ["Placement", "agree_on_placement", "chronological_window", "load_stats_from_window",
           "load_stats_to_json", "max_over_mean", "move_slot_arrays", "optimizer_states",
           "plan_placement", "rank_loads", "relocate_without_replicas", "relocation_sources",
           "static_placement"]
