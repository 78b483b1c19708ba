#!/usr/bin/env python3
"""Plan expert parallelism for a MoE config on a cluster: a table per EP size and phase, a
recommendation with its reasons, optionally a plot and JSON.

    python scripts/plan.py yaml_configs/deepseek_v3_256npu.yaml \
        --cluster yaml_configs/clusters/h800_infiniband.yaml --ep 8,16,32,64 \
        --dispatch-dtype fp8 --combine-dtype bf16 [--json] [--plot plan.png]

The model, its inputs and how it was checked: docs/scaling.md.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindspore_moe_ep.config import ConfigError, load_config  # noqa: E402
from mindspore_moe_ep.config.loader import _read_with_bases  # noqa: E402
from mindspore_moe_ep.planning import (BYTES_PER_ELEMENT, SEND_UNITS, LayerShape,  # noqa: E402
                                       PlanOptions, imbalance_from_loads, load_cluster, make_plan)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "int8", "fp8")


def int_list(text):
    """'8,16,32' -> [8, 16, 32]; anything else is refused naming the text."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the MoE YAML (its lm: section, if any, gives the layers)")
    parser.add_argument("--cluster", required=True, help="a cluster YAML (yaml_configs/clusters/)")
    parser.add_argument("--ep", type=int_list, help="EP sizes, e.g. 8,16,32 (default: powers of "
                        "two that divide num_experts and fit the cluster)")
    parser.add_argument("--decode-tokens", type=int_list,
                        help="tokens per rank of decode steps (default: the config's decode "
                             "batch and 128)")
    parser.add_argument("--prefill-tokens", type=int_list,
                        help="tokens per rank of prefill steps (default: the config's prefill "
                             "batch and dispatch.max_tokens_per_rank)")
    dtypes = sorted(BYTES_PER_ELEMENT)
    parser.add_argument("--dispatch-dtype", default=None, choices=dtypes,
                        help="bytes per element of the dispatch (default: runtime.dtype)")
    parser.add_argument("--combine-dtype", default=None, choices=dtypes,
                        help="bytes per element of the combine (default: runtime.dtype)")
    parser.add_argument("--compute-dtype", default=None, choices=COMPUTE_DTYPES,
                        help="the experts' GEMM dtype (default: runtime.dtype)")
    parser.add_argument("--send-unit", default="rank", choices=SEND_UNITS,
                        help="rank: once per destination rank (this library); node: once per "
                             "node over the network (two-level, DeepEP normal); expert: once "
                             "per (token, expert) (DeepEP low-latency, CANN grouped)")
    parser.add_argument("--imbalance", type=float, help="busiest rank's load / mean (default: "
                        "uniform routing's expected maximum)")
    parser.add_argument("--load-stats", help="JSON with 'tokens_per_expert' (a list, e.g. from "
                        "layer.stats()); gives the imbalance per EP size")
    parser.add_argument("--redundant-experts", type=int, default=0,
                        help="extra expert slots per rank (replicas of the hottest experts)")
    parser.add_argument("--soc", choices=("A2", "A3"), help="Ascend: add CANN's HCCL_BUFFSIZE")
    parser.add_argument("--moe-layers", type=int, help="MoE layers in the model (default: from "
                        "the lm: section, else 1); memory is checked for all of them")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.imbalance is not None and args.imbalance < 1:
        parser.error(f"--imbalance {args.imbalance} is not allowed: expected >= 1")
    if args.redundant_experts < 0:
        parser.error(f"--redundant-experts {args.redundant_experts} is not allowed: expected >= 0")
    return args


def layers_and_batches(path, config):
    """(MoE layers, default decode tokens, default prefill tokens) from the YAML."""
    tree, _ = _read_with_bases(path, chain=())
    workload = config.workload
    if "lm" in tree:
        lm = config.lm
        return (lm.num_layers - lm.dense_layers, [lm.max_batch_size, 128],
                [lm.max_batch_size * lm.max_seq_len, config.dispatch.max_tokens_per_rank])
    return (1, [workload.decode_batch_size, 128],
            [workload.batch_size * workload.prefill_seq_len, config.dispatch.max_tokens_per_rank])


def format_table(plan):
    head = (f"{'EP':>5} {'phase':>7} {'tokens':>7} {'nodes':>5} {'step us':>8} {'dispatch us':>11} "
            f"{'combine us':>10} {'experts us':>10} {'layer us':>9} {'disp GB/s':>9} "
            f"{'comb GB/s':>9} {'link':>5} {'imbal':>5} {'mem GiB':>8}")
    lines = [head, "-" * len(head)]
    for row in plan["rows"]:
        lines.append(
            f"{row['ep']:>5} {row['phase']:>7} {row['tokens_per_rank']:>7} {row['nodes']:>5} "
            f"{row.get('step_us', 0.0):>8.1f} {row['dispatch_us']:>11.1f} {row['combine_us']:>10.1f} {row['experts_us']:>10.1f} "
            f"{row['layer_us']:>9.1f} {row['dispatch_gbps']:>9.1f} {row['combine_gbps']:>9.1f} "
            f"{row['bottleneck_link']:>5} {row['imbalance']:>5.2f} "
            f"{row['memory_bytes'] / 2**30:>8.2f}")
    return "\n".join(lines)


def write_plot(plan, path):
    """Layer time per EP size, one line per (phase, tokens); a message if matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot "
              f"written", file=sys.stderr)
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    series = sorted({(row["phase"], row["tokens_per_rank"]) for row in plan["rows"]})
    for phase, tokens in series:
        points = [(row["ep"], row["layer_us"]) for row in plan["rows"]
                  if row["phase"] == phase and row["tokens_per_rank"] == tokens]
        axis.plot(*zip(*points), marker="o", label=f"{phase}, {tokens} tokens/rank")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("EP size")
    axis.set_ylabel("MoE layer step, us (step overhead + dispatch + experts + combine)")
    axis.set_title(f"{plan['cluster']['name']}: recommended EP {plan['recommendation']['ep']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        cluster = load_cluster(args.cluster)
    except ConfigError as error:
        sys.exit(f"plan.py: {error}")
    moe_layers, decode_default, prefill_default = layers_and_batches(args.config, config)
    if args.moe_layers is not None:
        if args.moe_layers < 1:
            sys.exit(f"plan.py: --moe-layers {args.moe_layers} is not allowed: expected >= 1")
        moe_layers = args.moe_layers
    shape = LayerShape.from_config(config)
    if args.compute_dtype:
        compute = args.compute_dtype
    else:
        compute = config.runtime.dtype
    imbalance = args.imbalance
    if args.load_stats:
        with open(args.load_stats, encoding="utf-8") as stream:
            loads = json.load(stream)["tokens_per_expert"]
        # One imbalance per EP size below: make_plan takes one value, so plan each EP alone.
    options = PlanOptions(dispatch_dtype=args.dispatch_dtype or config.runtime.dtype,
                          combine_dtype=args.combine_dtype or config.runtime.dtype,
                          compute_dtype=compute, send_unit=args.send_unit,
                          redundant_experts_per_rank=args.redundant_experts, imbalance=imbalance,
                          max_tokens_per_rank=max(args.prefill_tokens or prefill_default),
                          hccl_soc=args.soc)
    decode = sorted(set(args.decode_tokens or decode_default))
    prefill = sorted(set(args.prefill_tokens or prefill_default))
    try:
        if args.load_stats:
            from dataclasses import replace
            from mindspore_moe_ep.planning import candidate_eps
            eps = args.ep or candidate_eps(shape, cluster)
            plans = [make_plan(shape, cluster, [ep], decode, prefill,
                               replace(options, imbalance=imbalance_from_loads(
                                   loads, ep, args.redundant_experts)), moe_layers)
                     for ep in eps]
            plan = plans[0]
            plan["rows"] = [row for each in plans for row in each["rows"]]
            from mindspore_moe_ep.planning.planner import recommend
            from mindspore_moe_ep.planning.cost import Estimate
            plan["recommendation"] = recommend([Estimate(**row) for row in plan["rows"]], shape,
                                               cluster, options, options.max_tokens_per_rank, 0.3,
                                               moe_layers)
        else:
            plan = make_plan(shape, cluster, args.ep, decode, prefill, options, moe_layers)
    except (ValueError, ConfigError) as error:
        sys.exit(f"plan.py: {error}")
    plan["config"] = os.path.abspath(args.config)
    if args.plot:
        write_plot(plan, args.plot)
    if args.json:
        print(json.dumps(plan, indent=1))
        return
    print(f"cluster: {cluster.name} ({cluster.cards_per_node} cards per node, "
          f"{cluster.num_nodes} nodes); layer: hidden {shape.hidden}, {shape.num_experts} experts "
          f"top-{shape.top_k}; {moe_layers} MoE layer(s); dispatch {options.dispatch_dtype}, "
          f"combine {options.combine_dtype}, send unit {options.send_unit}")
    print(format_table(plan))
    recommendation = plan["recommendation"]
    print("\nrecommendation: " + ", ".join(f"{key} {value}" for key, value in
                                          recommendation.items() if key != "reasons"))
    for reason in recommendation["reasons"]:
        print(f"  - {reason}")
    if moe_layers > 1:
        row = next(r for r in plan["rows"] if r["ep"] == recommendation["ep"]
                   and r["phase"] == "decode" and r["tokens_per_rank"] == max(decode))
        print(f"  whole model: {moe_layers} MoE layers x {row['layer_us']:.0f} us = "
              f"{moe_layers * row['layer_us'] / 1000:.2f} ms of MoE per decode step at EP "
              f"{recommendation['ep']}")


if __name__ == "__main__":
    main()
