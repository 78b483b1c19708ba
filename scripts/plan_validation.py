#!/usr/bin/env python3
"""Print the planner's predictions next to the published DeepEP and DeepEP-Ascend figures
(the tables of docs/scaling.md; tests/test_planning.py asserts the same comparisons).

    python scripts/plan_validation.py
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_planning import (ASCEND_LOW_LATENCY, ASCEND_NORMAL, CLUSTERS, DEEPEP_LOW_LATENCY,  # noqa
                           DEEPEP_NORMAL, V3_LAYER, deepep_normal, low_latency)
from mindspore_moe_ep.planning import PlanOptions, estimate, load_cluster  # noqa: E402


def line(label, ep, predicted, published):
    errors = " / ".join(f"{(p - q) / q:+.0%}" for p, q in zip(predicted, published))
    print(f"| {label} | {ep} | {predicted[0]:.0f} / {predicted[1]:.0f} | "
          f"{published[0]} / {published[1]} | {errors} |")


def main():
    h800 = load_cluster(os.path.join(CLUSTERS, "h800_infiniband.yaml"))
    a3 = load_cluster(os.path.join(CLUSTERS, "atlas_a3_superpod.yaml"))
    print("| table | EP | predicted dispatch / combine | published | error |")
    print("| --- | --- | --- | --- | --- |")
    for ep, published in DEEPEP_NORMAL.items():
        row = deepep_normal(ep, h800)
        predicted = ((row.dispatch_bottleneck_gbps, row.combine_bottleneck_gbps) if ep == 8 else
                     (row.dispatch_inter_node_gbps, row.combine_inter_node_gbps))
        line("DeepEP normal, GB/s", ep, predicted, published)
    for ep, published in DEEPEP_LOW_LATENCY.items():
        row = low_latency(ep, h800, "fp8")
        line("DeepEP low-latency, us", ep, (row.dispatch_us, row.combine_us), published)
    for ep, published in ASCEND_NORMAL.items():
        row = estimate(V3_LAYER, a3, ep, "prefill", 4096,
                       PlanOptions(dispatch_dtype="int8", combine_dtype="bf16", imbalance=1.0))
        line("DeepEP-Ascend normal, GB/s", ep,
             (row.dispatch_bottleneck_gbps, row.combine_bottleneck_gbps), published)
    for ep, published in ASCEND_LOW_LATENCY.items():
        row = low_latency(ep, a3, "int8")
        line("DeepEP-Ascend low-latency, us", ep, (row.dispatch_us, row.combine_us), published)


if __name__ == "__main__":
    main()
