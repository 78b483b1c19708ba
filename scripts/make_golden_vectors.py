#!/usr/bin/env python
"""Write the golden vectors of tests/golden/ from the independent NumPy references.

    python scripts/make_golden_vectors.py            # (re)write tests/golden/*.npz
    python scripts/make_golden_vectors.py --check    # exit 1 if a file differs from the generator

Each .npz holds the inputs and the expected outputs of one case; float expectations are float64.
Kernel cases come from tests/reference/numpy_kernels.py (the kernel contracts), layer cases from
tests/reference/numpy_moe.py (the whole layer, float64). The same files check the CPU kernels
(tests/test_golden_vectors.py) and the Ascend kernels (tests/test_ascend.py). Inputs are drawn
from fixed seeds, so the files are reproducible; they are kept small (a few KB each).
"""
import argparse
import json
import os
import sys
from typing import Dict

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
sys.path.insert(0, os.path.join(REPO, "tests"))

from reference import numpy_kernels as kernels  # noqa: E402
from reference import numpy_moe as ref  # noqa: E402

Case = Dict[str, np.ndarray]

# The layer cases use tiny.yaml's sizes and routing (overrides below are relative to it).
LAYER_HIDDEN, LAYER_EXPERTS, LAYER_FFN, LAYER_TOP_K = 16, 8, 12, 2
MIN_ROUTING_MARGIN = 1e-3


def _expert_ids(rng, tokens, top_k, num_experts, masked=0):
    """[T, K] int32 distinct experts per token; ``masked`` random entries set to -1."""
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)])
    ids = ids.astype(np.int32)
    for flat in rng.choice(tokens * top_k, masked, replace=False):
        ids.flat[flat] = -1
    return ids


def dispatch_case(seed: int, capacity: int, masked: int) -> Case:
    rng = np.random.default_rng(seed)
    tokens, top_k, hidden, experts = 9, 3, 8, 4
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids = _expert_ids(rng, tokens, top_k, experts, masked)
    expected = kernels.dispatch(x, ids, experts, capacity)
    if masked == 0 and capacity > 0:   # cross-check the capacity policy with the layer reference
        factor = capacity * experts / (tokens * top_k)
        keep, kept, dropped = ref.apply_capacity(ids.astype(np.int64), experts, factor)
        assert ref.expert_capacity(factor, tokens, top_k, experts) == capacity
        assert np.array_equal(kept, expected["tokens_per_expert"])
        assert dropped == int(expected["num_dropped"][0])
        assert np.array_equal(keep, expected["positions"] >= 0)
    return dict(x=x, expert_ids=ids, capacity=np.array([capacity], np.int32),
                num_experts=np.array(experts), **expected)


def combine_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    tokens, top_k, rows, hidden = 6, 3, 20, 8
    expert_out = rng.standard_normal((rows, hidden)).astype(np.float32)
    positions = rng.permutation(rows)[:tokens * top_k].reshape(tokens, top_k).astype(np.int32)
    positions[1, 2] = positions[4, 0] = positions[5, 1] = -1        # dropped / masked pairs
    positions[3, :] = -1                                            # a token with no expert
    weights = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    return dict(expert_out=expert_out, positions=positions, weights=weights,
                y=kernels.gather_sum(expert_out, positions, weights),
                y_unweighted=kernels.gather_sum(expert_out, positions))


def layout_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    tokens, top_k, world_size, experts_per_rank = 7, 3, 4, 2
    ids = _expert_ids(rng, tokens, top_k, world_size * experts_per_rank)
    ids[2] = [0, 1, 5]                     # two experts on rank 0: the token is sent there once
    capacity = tokens
    expected = kernels.expert_parallel_layout(ids, experts_per_rank, world_size, capacity)
    return dict(expert_ids=ids, experts_per_rank=np.array([experts_per_rank], np.int32),
                world_size=np.array(world_size), capacity_per_rank=np.array(capacity), **expected)


def layer_case(seed: int, capacity_factor=None) -> Case:
    """A tiny.yaml-shaped layer (with its shared expert): weights, input and float64 output."""
    rng = np.random.default_rng(seed)
    cfg = ref.RefConfig(num_experts=LAYER_EXPERTS, top_k=LAYER_TOP_K,
                        capacity_factor=capacity_factor)
    params = ref.make_params(rng, LAYER_HIDDEN, LAYER_FFN, LAYER_EXPERTS, shared_ffn=LAYER_FFN,
                             gate_scale=2.0)
    tokens = []
    while len(tokens) < 2 * 6:
        token = rng.standard_normal((1, LAYER_HIDDEN)).astype(np.float32)
        if ref.routing_margin(token, params, cfg) >= MIN_ROUTING_MARGIN:
            tokens.append(token[0])
    x = np.stack(tokens).reshape(2, 6, LAYER_HIDDEN)
    y, stats = ref.moe_forward(params, x, cfg)
    overrides = {"capacity_factor": capacity_factor} if capacity_factor else {}
    case = {f"param:{name}": value for name, value in params.items()}
    case.update(x=x, y=y, expert_ids=stats["expert_ids"].astype(np.int32),
                weights=stats["weights"], tokens_per_expert=stats["tokens_per_expert"],
                num_dropped=np.array(stats["num_dropped"]),
                overrides=np.array(json.dumps(overrides)))
    return case


def golden_cases() -> Dict[str, Case]:
    """Every golden case by file name (without .npz)."""
    return {
        "dispatch_dropless": dispatch_case(seed=1, capacity=0, masked=3),
        "dispatch_capacity": dispatch_case(seed=2, capacity=5, masked=0),
        "combine": combine_case(seed=3),
        "expert_parallel_layout": layout_case(seed=4),
        "layer_dropless": layer_case(seed=5),
        "layer_capacity": layer_case(seed=6, capacity_factor=1.0),
    }


# Float results may differ in their last bits from one CPU (and BLAS kernel, and libm) to
# another. In float64, a sum of n terms is exact to about n * 2.2e-16 of the terms' magnitude in
# any order; the chain of reductions from input to output here is under 64 terms long (router
# and FFN products over H = 16 and F = 12, the top-k and shared-expert sums), so differences stay
# below ~64 * 2.2e-16 = 1.4e-14 of the magnitude (seen: 4e-16 between an AMD EPYC with AVX2 and
# an Intel Xeon with AVX-512). Float arrays are compared within FLOAT_REL_TOL of their largest
# magnitude (70x that bound, and still 1e6 tighter than the float32 tolerance the kernels are
# held to); every other array (ids, counts, positions, layouts, options) must be equal.
FLOAT_REL_TOL = 1e-12


def _same(stored: np.ndarray, generated: np.ndarray) -> bool:
    """Whether a stored array matches the generated one (see FLOAT_REL_TOL)."""
    if stored.shape != generated.shape or stored.dtype != generated.dtype:
        return False
    if not np.issubdtype(generated.dtype, np.floating):
        return bool(np.array_equal(stored, generated))
    scale = float(np.abs(generated).max(initial=0.0))
    return bool(np.all(np.abs(stored.astype(np.float64) - generated) <= FLOAT_REL_TOL * scale))


def differences(directory: str = GOLDEN_DIR) -> list:
    """Names of the cases whose file is missing or differs from golden_cases() (floats within
    FLOAT_REL_TOL, everything else exactly)."""
    stale = []
    for name, case in golden_cases().items():
        path = os.path.join(directory, name + ".npz")
        if not os.path.exists(path):
            stale.append(name)
            continue
        with np.load(path) as stored:
            if set(stored.files) != set(case) or not all(
                    _same(stored[key], value) for key, value in case.items()):
                stale.append(name)
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare the files with the generator (exit 1 if they differ)")
    args = parser.parse_args(argv)
    if args.check:
        stale = differences()
        print("golden vectors up to date" if not stale else f"stale golden vectors: {stale}")
        return 1 if stale else 0
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for name, case in golden_cases().items():
        path = os.path.join(GOLDEN_DIR, name + ".npz")
        np.savez_compressed(path, **case)
        print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
