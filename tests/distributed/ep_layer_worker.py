"""msrun worker: every check of expert parallelism on the MoE layer, in one launch.

One launch runs every part for its world size W (msrun --worker_num=W), in PYNATIVE_MODE and,
for a representative subset, GRAPH_MODE; tests/test_expert_parallel.py reads the reports. Each
rank records one (case, ok, detail) entry per check and a few measured values (max errors,
counts, seconds), and writes its report with launch.write_result. The parts live in one module
per subject, each runnable alone under msrun; this worker runs them in sequence, because a
launch costs far more than most parts (~15-25 s):

- ep_layer_routing_worker.py: ``routing``, ``combine_paths`` (the dispatchers driven directly);
- ep_layer_forward_worker.py: ``layer``, ``capacity`` (forward against the single process);
- ep_layer_gradients_worker.py: ``grad``;
- ep_layer_dp_ep_worker.py: ``dp_ep`` (W = 4: expert_parallel 2, two data-parallel replicas);
- ep_layer_bad_input_worker.py: ``bad`` (last: it breaks windows).

Determinism is checked inside ``layer``, ``grad`` and ``capacity``: every forward and gradient
is repeated and must be bitwise identical to the first run. Shared helpers:
ep_layer_common.py (configs, tolerances, modes, the driver) and ep_layer_reference.py (a layer
against its single-process counterpart).

Usage: msrun ... ep_layer_worker.py [--parts a,b,...]
"""
import ep_layer_bad_input_worker
import ep_layer_dp_ep_worker
import ep_layer_forward_worker
import ep_layer_gradients_worker
import ep_layer_routing_worker
from ep_layer_common import run_parts

PART_FUNCTIONS = {
    **ep_layer_routing_worker.PART_FUNCTIONS,
    "layer": ep_layer_forward_worker.layer_part,
    **ep_layer_gradients_worker.PART_FUNCTIONS,
    "capacity": ep_layer_forward_worker.capacity_part,
    **ep_layer_dp_ep_worker.PART_FUNCTIONS,
    **ep_layer_bad_input_worker.PART_FUNCTIONS,  # last: it breaks windows
}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
