#!/usr/bin/env python
"""A step's time does not depend on dispatch.max_tokens_per_rank beyond the memory it reserves.

    python scripts/benchmarks/bound_independence.py [--quick] [--out DIR]

The layer of end_to_end.py (Mixtral-style, H = 1024, F = 512, 16 experts, top-2, EP 4, float32)
built twice in one msrun job, with the default bound (4,096 tokens per rank) and with a bound
equal to the step (512), and the same 512-token training step (``value_and_grad`` of
``layer(x, phase="prefill").sum()``) and prefill inference step timed on both, alternating
between the two layers so that both see the same machine load. Reports the slowest rank's best
time of each and their ratio. Target (issue 17): default-bound step <= 1.05x the 512-bound step.
"""
import sys

import bench_common as bc
from end_to_end import HF_CONFIG, WORLD, inputs

NAME = "bound_independence"
TOKENS = 512
BOUNDS = {"default": None, "equal_to_step": TOKENS}
TARGET = 1.05


def timed_steps(ms, layer, x):
    """{"train": a training step, "prefill": an inference step} of ``layer`` on ``x``."""
    def loss(inputs_):
        return layer(inputs_, phase="prefill").sum()
    gradient = ms.value_and_grad(loss, 0, layer.trainable_params())

    def train():
        layer.set_train(True)
        gradient(x)[1][0].asnumpy()

    def prefill():
        layer.set_train(False)
        layer(x, phase="prefill").asnumpy()
    return {"train": train, "prefill": prefill}


def ms_worker(quick):
    import time

    import mindspore as ms
    from mindspore import Tensor
    from mindspore.communication import get_rank, init

    import mindspore_moe_ep as mee

    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    rank = get_rank()
    x = Tensor(inputs(rank, TOKENS))
    rounds = 3 if quick else 8
    steps = {}
    for name, bound in BOUNDS.items():
        config = mee.config_from_hf(HF_CONFIG, expert_parallel=WORLD)
        if bound is not None:
            config = config.replace(max_tokens_per_rank=bound)
        steps[name] = timed_steps(ms, mee.MoELayer(config), x)
        for step in steps[name].values():
            step()  # compiled
    samples = {name: {"train": [], "prefill": []} for name in BOUNDS}
    for _ in range(rounds):  # alternate the layers: both see the same load
        for name in BOUNDS:
            for phase in ("train", "prefill"):
                bc.world_barrier()
                start = time.perf_counter()
                steps[name][phase]()
                samples[name][phase].append(time.perf_counter() - start)
    bc.write_worker_result({"rank": rank, "min_s": {
        name: {phase: min(values) for phase, values in by_phase.items()}
        for name, by_phase in samples.items()}})


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    args = parser.parse_args(argv)
    if args.role == "ms":
        return ms_worker(args.quick)
    print(f"[{NAME}] {bc.describe_machine(bc.machine_info())}", flush=True)
    reports = bc.launch_msrun(__file__, WORLD, ["--role", "ms"]
                              + (["--quick"] if args.quick else []), timeout_s=1800)
    rows, results = [], {}
    for phase in ("train", "prefill"):
        times = {name: max(r["min_s"][name][phase] for r in reports) for name in BOUNDS}
        ratio = times["default"] / times["equal_to_step"]
        results[phase] = {"default_ms": times["default"] * 1e3,
                          "equal_to_step_ms": times["equal_to_step"] * 1e3, "ratio": ratio,
                          "met": bool(ratio <= TARGET)}
        rows.append([phase, times["default"] * 1e3, times["equal_to_step"] * 1e3, ratio])
    print(bc.table(["step", f"bound 4096 ms", f"bound {TOKENS} ms", "ratio"], rows))
    print(f"[{NAME}] target: ratio <= {TARGET} at T = {TOKENS}: "
          + ", ".join(f"{phase} {'met' if r['met'] else 'not met'}"
                      for phase, r in results.items()), flush=True)
    bc.write_results(args.out, NAME, {
        "config": {"tokens_per_rank": TOKENS, "bounds": BOUNDS, "ranks": WORLD,
                   "quick": args.quick},
        "method": __doc__.split("\n\n", 2)[2], "results": results,
        "summary": {"target": f"<= {TARGET}", "met": all(r["met"] for r in results.values())}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
