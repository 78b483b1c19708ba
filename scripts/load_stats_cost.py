#!/usr/bin/env python
"""Cost of the expert-load window in the step (docs/load_balancing.md): the same MoE layer with
and without ``_record_load`` (the ring-buffer write and the step counter), one process.

    python scripts/load_stats_cost.py yaml_configs/deepseek_v3_small_4cpu.yaml --tokens 256 \\
        --phase prefill [--train] [--steps 30] [--rounds 5]

Both layers run in the same process, in alternating rounds of ``--steps`` steps after a warm-up
(GRAPH_MODE compiles there); prints each round's mean step time of both and the medians, then
the time of the window's update alone (a Cell running only ``_record_load``) less that of a Cell
running one element-wise op (the launch), per call.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--phase", choices=["prefill", "decode"], default="prefill")
    parser.add_argument("--train", action="store_true", help="forward + backward (value_and_grad)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    args = parser.parse_args(argv)

    import mindspore as ms
    from mindspore import Tensor, nn
    import mindspore_moe_ep as mee
    from mindspore_moe_ep.layer import MoELayer

    class WithoutLoadWindow(MoELayer):
        def _record_load(self, routed_per_expert):
            return None

    class Step(nn.Cell):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer
            self.grad = ms.value_and_grad(layer, None,
                                          ms.ParameterTuple(layer.trainable_params()))

        def construct(self, x):
            if self.training:
                loss, _ = self.grad(x)
                return loss
            return self.layer(x, self.layer_phase)

    config = mee.load_config(args.config, expert_parallel=1, mode=args.mode)
    mee.setup_runtime(config)
    x = Tensor(np.random.default_rng(0).standard_normal(
        (args.tokens, config.model.hidden_size)).astype(np.float32))
    steps = {}
    for name, cls in (("with", MoELayer), ("without", WithoutLoadWindow)):
        layer = cls(config)
        step = Step(layer)
        step.layer_phase = None if args.train else args.phase
        step.set_train(args.train)
        for _ in range(3):
            step(x).asnumpy()
        steps[name] = step
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                out = step(x)
            out.asnumpy()
            times[name].append((time.perf_counter() - started) / args.steps * 1e3)
    for name, values in times.items():
        print(f"{name:8s} load window: per-round mean step ms "
              f"{' '.join(f'{v:.3f}' for v in values)}; median {statistics.median(values):.3f}")
    with_ms, without_ms = (statistics.median(times[name]) for name in ("with", "without"))
    print(f"difference {with_ms - without_ms:+.3f} ms per step "
          f"({(with_ms / without_ms - 1) * 100:+.1f}%)")

    class RecordOnly(nn.Cell):
        def __init__(self, layer, record):
            super().__init__()
            self.layer = layer
            self.record = record

        def construct(self, routed_per_expert):
            if self.record:
                self.layer._record_load(routed_per_expert)
            return routed_per_expert + 1

    routed = Tensor(np.ones(config.model.num_experts, np.float32))
    per_call = {}
    for record in (True, False):
        cell = RecordOnly(steps["with"].layer, record)
        for _ in range(3):
            cell(routed).asnumpy()
        rounds = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            for _ in range(args.steps * 10):
                out = cell(routed)
            out.asnumpy()
            rounds.append((time.perf_counter() - started) / (args.steps * 10) * 1e6)
        per_call[record] = statistics.median(rounds)
    print(f"the window's update alone ([{config.parallel.load_window_steps}, "
          f"{config.model.num_experts}] ring buffer): {per_call[True]:.1f} us per call, "
          f"{per_call[True] - per_call[False]:.1f} us more than the launch of a one-op Cell")


if __name__ == "__main__":
    main()
