#!/usr/bin/env python
"""Layer times at EP 2 and EP 4 for checking the planner's cost model (issue 21, section 2).

    python scripts/benchmarks/layer_times.py [--ep 2,4] [--quick] [--out DIR]
                                             [--max-other-load 0.1] [--tries 3]

The whole ``MoELayer`` in inference, under msrun with one worker per rank (EP = world size),
on the layers of two existing benchmarks, measured as they measure them:

- ``end_to_end`` (scripts/benchmarks/end_to_end.py): Mixtral-style, H = 1024, F = 512, 16
  experts, top-2 softmax, no shared expert, ``config_from_hf(..., expert_parallel=EP)`` with
  every default (``max_tokens_per_rank`` 4096); ``layer(x, phase="prefill")`` at T = 512 and
  2048 tokens per rank, ``layer(x, phase="decode")`` at T = 1 and 128;
- ``decode_latency`` (scripts/benchmarks/decode_latency.py, its "layer" columns at hidden
  2048): H = 2048, 64 experts of width 256, top-8 of 8 groups (4 picked), one shared expert,
  ``max_tokens_per_rank`` 128, transport shm, row-wise decode; ``phase="decode"`` at T = 1 and
  128, ``phase="prefill"`` at T = 128.

float32, GRAPH_MODE, the library's host defaults (kernel threads = usable cores / ranks, at
least 1), random inputs per rank (the router decides the routing). A time is the slowest
rank's best of ``repeats`` calls, each started after a barrier, after one compiling call (the
benchmarks' rule); the median is kept too, and each rank's expert rows and touched experts
of the step (its routing). The 1-minute load average is recorded before and after each EP size,
and the cores other processes used while it ran (``bench_common.OtherLoad``); an EP size's run
is repeated, up to ``--tries`` times, while that exceeds ``--max-other-load`` (the least
disturbed run is kept). ``python scripts/plan_validation.py --layer-times
DIR/layer_times.json`` puts the planner's predictions next to these figures
(docs/scaling.md).
"""
import os
import sys
import time

import numpy as np

import bench_common as bc

NAME = "layer_times"
END_TO_END_HF = {"model_type": "mixtral", "hidden_size": 1024, "intermediate_size": 512,
                 "num_local_experts": 16, "num_experts_per_tok": 2}


def decode_latency_config(ep):
    """decode_latency.py's layer at hidden 2048, as a config dict (EP = ``ep``)."""
    return {"model": {"hidden_size": 2048, "num_experts": 64, "expert_ffn_size": 256,
                      "num_shared_experts": 1},
            "router": {"top_k": 8, "score_func": "sigmoid", "num_groups": 8, "topk_groups": 4,
                       "routed_scaling_factor": 2.5},
            "parallel": {"expert_parallel": ep},
            "dispatch": {"max_tokens_per_rank": 128, "decode_token_threshold": 128,
                         "transport": "shm", "decode_layout": "rowwise"},
            "runtime": {"mode": "graph", "dtype": "float32"}}


def workloads(quick):
    """{name: [(phase, tokens per rank), ...]} and repeats."""
    steps = {"end_to_end": [("prefill", 512), ("prefill", 2048), ("decode", 1), ("decode", 128)],
             "decode_latency": [("decode", 1), ("decode", 128), ("prefill", 128)]}
    return steps, (3 if quick else 5)


def config_of(name, ep):
    """The MoEConfig of workload ``name`` at EP ``ep`` (also used by plan_validation.py; the
    config package imports no MindSpore)."""
    from mindspore_moe_ep.config import MoEConfig, config_from_hf
    if name == "end_to_end":
        return config_from_hf(END_TO_END_HF, expert_parallel=ep)
    return MoEConfig.from_dict(decode_latency_config(ep))


def ms_worker(quick):
    from mindspore import Tensor
    import mindspore_moe_ep as mee

    rank = bc.start_mindspore("graph", distributed=True)
    from mindspore.communication import get_group_size
    ep = get_group_size()
    steps, repeats = workloads(quick)

    barrier = bc.world_barrier

    results = []
    for name, plan in steps.items():
        layer = mee.MoELayer(config_of(name, ep))
        layer.set_train(False)
        for phase, tokens in plan:
            x = Tensor(np.random.default_rng(1000 * rank + tokens).standard_normal(
                (tokens, layer.hidden_size), dtype=np.float32))
            layer(x, phase).asnumpy()  # compile
            samples = []
            for _ in range(repeats):
                barrier()
                start = time.perf_counter()
                layer(x, phase).asnumpy()
                samples.append(time.perf_counter() - start)
            stats = layer.stats()  # the last call's routing: this rank's expert rows
            results.append({"workload": name, "phase": phase, "tokens": tokens,
                            "path": layer.experts_path(tokens, phase),
                            "min_s": min(samples), "median_s": float(np.median(samples)),
                            "pairs": int(stats["tokens_per_expert"].sum()),
                            "touched": int((stats["tokens_per_expert"] > 0).sum())})
        layer.close()
        del layer
    bc.write_worker_result({"rank": rank, "results": results,
                            "host_defaults": mee.applied_host_defaults()})


def merge(reports):
    """The slowest rank's best (and median) per (workload, phase, tokens); the expert rows
    ((token, expert) pairs) and touched experts of every rank."""
    merged = {}
    for report in reports:
        for entry in report["results"]:
            key = (entry["workload"], entry["phase"], entry["tokens"])
            current = merged.setdefault(key, dict(entry, pairs=[], touched=[]))
            current["min_s"] = max(current["min_s"], entry["min_s"])
            current["median_s"] = max(current["median_s"], entry["median_s"])
            current["pairs"].append(entry["pairs"])
            current["touched"].append(entry["touched"])
    return list(merged.values())


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    parser.add_argument("--ep", default="2,4", help="EP sizes (msrun workers), e.g. 2,4")
    parser.add_argument("--max-other-load", type=float, default=0.1,
                        help="repeat an EP size's run while other processes used more cores "
                             "than this during it")
    parser.add_argument("--tries", type=int, default=3)
    args = parser.parse_args(argv)
    if args.role == "ms":
        return ms_worker(args.quick)
    eps = [int(part) for part in args.ep.split(",")]
    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    script = os.path.abspath(__file__)
    extra = ["--quick"] if args.quick else []
    progress = bc.Progress(NAME, len(eps))
    rows, loads = [], {}
    for ep in eps:
        kept = None
        for attempt in range(1, args.tries + 1):
            before = os.getloadavg()[0]
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            with bc.OtherLoad() as other:
                reports = bc.launch_msrun(script, ep, ["--role", "ms", *extra], timeout_s=1800)
            run = {"load_1m_before": before, "load_1m_after": os.getloadavg()[0],
                   "started_utc": started, "other_cores": other.cores,
                   "steal_cores": other.steal_cores, "try": attempt,
                   "host_defaults": reports[0].get("host_defaults")}
            print(f"[{NAME}] EP {ep} try {attempt}: other processes used {other.cores:.2f} "
                  f"cores (load {before:.2f} -> {run['load_1m_after']:.2f})", flush=True)
            if kept is None or other.cores < kept[0]["other_cores"]:
                kept = (run, reports)
            if other.cores <= args.max_other_load:
                break
        loads[ep], reports = kept
        for entry in merge(reports):
            rows.append({"ep": ep, **entry})
        progress.step(f"EP {ep}")
    rows.sort(key=lambda r: (r["workload"], r["phase"], r["tokens"], r["ep"]))
    print(bc.table(["workload", "phase", "T/rank", "EP", "path", "best ms", "median ms",
                    "pairs per rank", "touched experts per rank"],
                   [[r["workload"], r["phase"], r["tokens"], r["ep"], r["path"],
                     r["min_s"] * 1e3, r["median_s"] * 1e3, r["pairs"], r["touched"]]
                    for r in rows]))
    _, repeats = workloads(args.quick)
    bc.write_results(args.out, NAME, {
        "config": {"eps": eps, "repeats": repeats, "quick": args.quick, "dtype": "float32",
                   "end_to_end_hf": END_TO_END_HF,
                   "decode_latency": decode_latency_config("EP")},
        "method": __doc__.split("\n\n", 2)[2], "loads": loads, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
