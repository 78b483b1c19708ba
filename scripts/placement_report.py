#!/usr/bin/env python
"""Max/mean rank load of the placements on Zipf-skewed expert loads (docs/load_balancing.md).

    python scripts/placement_report.py [--experts 64] [--ranks 8] [--redundant-per-rank 1]

Expert loads follow Zipf's law, load of the i-th hottest proportional to 1 / i**s, with the
hottest experts at seeded random ids (so the static placement is not worst-case by
construction). Prints one row per exponent: the static placement (expert e on rank e // L),
the relocation without replicas and plan_placement with the redundant slots.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mindspore_moe_ep.load_balancing import (plan_placement,  # noqa: E402
                                             relocate_without_replicas, static_placement)

EXPONENTS = (0.8, 1.2, 1.6)


def zipf_loads(num_experts, exponent, seed=0, total=1_000_000):
    """[E] expected tokens per expert: total * i**-s / sum, the hottest at random ids."""
    weights = 1.0 / np.arange(1, num_experts + 1) ** exponent
    loads = np.empty(num_experts)
    loads[np.random.default_rng(seed).permutation(num_experts)] = weights / weights.sum() * total
    return loads


def report_rows(num_experts, num_ranks, redundant_per_rank, exponents=EXPONENTS):
    """[(exponent, static, relocated, planned)] max/mean rank loads."""
    slots = num_experts // num_ranks + redundant_per_rank
    return [(exponent,
             static_placement(loads, num_ranks).max_over_mean(),
             relocate_without_replicas(loads, num_ranks).max_over_mean(),
             plan_placement(loads, num_ranks, slots).max_over_mean())
            for exponent, loads in ((s, zipf_loads(num_experts, s)) for s in exponents)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--redundant-per-rank", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"| Zipf exponent | static | relocated, no replicas | plan_placement "
          f"(+{args.redundant_per_rank} slot/rank) |")
    print("| --- | --- | --- | --- |")
    for exponent, static, relocated, planned in report_rows(args.experts, args.ranks,
                                                            args.redundant_per_rank):
        print(f"| {exponent} | {static:.3f} | {relocated:.3f} | {planned:.3f} |")


if __name__ == "__main__":
    main()
