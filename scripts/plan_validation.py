#!/usr/bin/env python3
"""Print the planner's predictions next to the published DeepEP and DeepEP-Ascend figures
(the tables of docs/scaling.md; tests/test_planning.py asserts the same comparisons), and,
with ``--layer-times``, next to this machine's own EP 2 and EP 4 layer times.

    python scripts/plan_validation.py
    python scripts/plan_validation.py --layer-times bench_results/layer_times.json \
        [--benchmarks bench_results] [--cluster yaml_configs/clusters/cpu_host.yaml] \
        [--json comparison.json]

The layer times come from ``scripts/benchmarks/layer_times.py`` (the layers of the
end_to_end and decode_latency benchmarks at EP 2 and EP 4, prefill and decode) and, with
``--benchmarks``, from those benchmarks' own JSON files (their EP 4 layer rows); the
predictions from the cluster file that ``scripts/calibrate_host.py`` measured. A prediction
is within the issue's tolerance when it is within 25% of the measured time.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "scripts", "benchmarks"))

from test_planning import (ASCEND_LOW_LATENCY, ASCEND_NORMAL, CLUSTERS, DEEPEP_LOW_LATENCY,  # noqa
                           DEEPEP_NORMAL, V3_LAYER, deepep_normal, low_latency)
from mindspore_moe_ep.planning import (LayerShape, PlanOptions, estimate,  # noqa: E402
                                       load_cluster)

OWN_RUNS_TOLERANCE = 0.25


def line(label, ep, predicted, published):
    errors = " / ".join(f"{(p - q) / q:+.0%}" for p, q in zip(predicted, published))
    print(f"| {label} | {ep} | {predicted[0]:.0f} / {predicted[1]:.0f} | "
          f"{published[0]} / {published[1]} | {errors} |")


def published():
    h800 = load_cluster(os.path.join(CLUSTERS, "h800_infiniband.yaml"))
    a3 = load_cluster(os.path.join(CLUSTERS, "atlas_a3_superpod.yaml"))
    print("| table | EP | predicted dispatch / combine | published | error |")
    print("| --- | --- | --- | --- | --- |")
    for ep, figures in DEEPEP_NORMAL.items():
        row = deepep_normal(ep, h800)
        predicted = ((row.dispatch_bottleneck_gbps, row.combine_bottleneck_gbps) if ep == 8 else
                     (row.dispatch_inter_node_gbps, row.combine_inter_node_gbps))
        line("DeepEP normal, GB/s", ep, predicted, figures)
    for ep, figures in DEEPEP_LOW_LATENCY.items():
        row = low_latency(ep, h800, "fp8")
        line("DeepEP low-latency, us", ep, (row.dispatch_us, row.combine_us), figures)
    for ep, figures in ASCEND_NORMAL.items():
        row = estimate(V3_LAYER, a3, ep, "prefill", 4096,
                       PlanOptions(dispatch_dtype="int8", combine_dtype="bf16", imbalance=1.0))
        line("DeepEP-Ascend normal, GB/s", ep,
             (row.dispatch_bottleneck_gbps, row.combine_bottleneck_gbps), figures)
    for ep, figures in ASCEND_LOW_LATENCY.items():
        row = low_latency(ep, a3, "int8")
        line("DeepEP-Ascend low-latency, us", ep, (row.dispatch_us, row.combine_us), figures)


def predict_layer(shape, cluster, ep, phase, tokens, capacity):
    """The planner's estimate of one measured layer step (float32 rows and GEMMs, as run)."""
    options = PlanOptions(dispatch_dtype=shape.weight_dtype, combine_dtype=shape.weight_dtype,
                          compute_dtype=shape.weight_dtype)
    return estimate(shape, cluster, ep, phase, tokens, options, capacity)


def benchmark_rows(directory):
    """The EP 4 layer rows of the benchmarks' own JSON files in ``directory``, in the form of
    layer_times.json rows: decode_latency.json (its hidden-2048 "layer" columns: decode and
    prefill) and end_to_end.json (ours, prefill and decode); the files that exist."""
    rows, sources = [], []
    path = os.path.join(directory, "decode_latency.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as stream:
            result = json.load(stream)
        sources.append((path, result))
        for entry in result["rows"]:
            if entry["hidden"] != 2048:  # layer_times' decode_latency layer is the 2048 one
                continue
            for phase in ("decode", "prefill"):
                rows.append({"workload": "decode_latency", "phase": phase,
                             "tokens": entry["tokens_per_rank"], "ep": result["config"]["ranks"],
                             "min_s": entry[f"layer_{phase}_us"] / 1e6,
                             "source": "decode_latency.py"})
    path = os.path.join(directory, "end_to_end.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as stream:
            result = json.load(stream)
        sources.append((path, result))
        for phase in ("prefill", "decode"):
            for tokens, seconds in sorted(result["results"]["ours"][phase].items(),
                                          key=lambda item: int(item[0])):
                rows.append({"workload": "end_to_end", "phase": phase, "tokens": int(tokens),
                             "ep": result["config"]["ranks"], "min_s": seconds,
                             "source": "end_to_end.py"})
    return rows, sources


def own_runs(path, cluster_path, json_out=None, benchmarks=None):
    """The predicted and measured layer times of ``path`` (layer_times.json; None: none) and
    of the benchmarks' JSON files in ``benchmarks`` (a directory; None: none), as a table."""
    import layer_times
    cluster = load_cluster(cluster_path)
    print(f"\nOwn runs against cluster {os.path.relpath(cluster_path)} ({cluster.source})")
    measured_rows = []
    if path:
        with open(path, encoding="utf-8") as stream:
            measured = json.load(stream)
        print(f"- {os.path.relpath(path)}: measured {measured['machine']['date_utc']}, "
              f"{measured['machine']['cpu_model']}")
        for ep, run in sorted(measured["loads"].items(), key=lambda item: int(item[0])):
            print(f"  EP {ep}: started {run['started_utc']} UTC, 1-minute load average "
                  f"{run['load_1m_before']:.2f} before, {run['load_1m_after']:.2f} after; other "
                  f"processes used {run.get('other_cores', float('nan')):.2f} cores during it")
        measured_rows += [dict(entry, source="layer_times.py") for entry in measured["rows"]]
    if benchmarks:
        rows, sources = benchmark_rows(benchmarks)
        for source, result in sources:
            print(f"- {os.path.relpath(source)}: measured {result['machine']['date_utc']}, "
                  f"1-minute load average {result['machine']['load_average_1m_at_start']:.2f} "
                  f"at its start")
        measured_rows += rows
    print("\n| layer | phase | T/rank | EP | measured by | measured ms | predicted ms | step / "
          "exchange / experts ms | predicted / measured | within 25% |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for entry in measured_rows:
        config = layer_times.config_of(entry["workload"], entry["ep"])
        shape = LayerShape.from_config(config)
        row = predict_layer(shape, cluster, entry["ep"], entry["phase"], entry["tokens"],
                            config.dispatch.max_tokens_per_rank)
        ratio = row.layer_us / (entry["min_s"] * 1e6)
        within = abs(ratio - 1) <= OWN_RUNS_TOLERANCE
        rows.append({"workload": entry["workload"], "phase": entry["phase"],
                     "tokens_per_rank": entry["tokens"], "ep": entry["ep"],
                     "measured_by": entry["source"],
                     "measured_ms": entry["min_s"] * 1e3, "predicted_ms": row.layer_us / 1e3,
                     "step_ms": row.step_us / 1e3,
                     "exchange_ms": (row.dispatch_us + row.combine_us) / 1e3,
                     "experts_ms": row.experts_us / 1e3, "ratio": ratio, "within": within})
        print(f"| {entry['workload']} | {entry['phase']} | {entry['tokens']} | {entry['ep']} | "
              f"{entry['source']} | {entry['min_s'] * 1e3:.1f} | {row.layer_us / 1e3:.1f} | "
              f"{row.step_us / 1e3:.1f} / {(row.dispatch_us + row.combine_us) / 1e3:.1f} / "
              f"{row.experts_us / 1e3:.1f} | {ratio:.2f} | {'yes' if within else '**no**'} |")
    inside = sum(row["within"] for row in rows)
    print(f"\n{inside} of {len(rows)} predictions within {OWN_RUNS_TOLERANCE:.0%} of the "
          f"measured layer time")
    if json_out:
        with open(json_out, "w", encoding="utf-8") as stream:
            json.dump({"layer_times": path and os.path.abspath(path),
                       "benchmarks": benchmarks and os.path.abspath(benchmarks),
                       "cluster": cluster.as_dict(), "rows": rows}, stream, indent=1)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer-times", help="layer_times.json of scripts/benchmarks/"
                        "layer_times.py: also compare the planner with these runs")
    parser.add_argument("--benchmarks", help="a directory with decode_latency.json and/or "
                        "end_to_end.json of scripts/benchmarks: also compare with their EP 4 "
                        "layer rows")
    parser.add_argument("--cluster", default=os.path.join(CLUSTERS, "cpu_host.yaml"),
                        help="the cluster file of the machine the layer times come from")
    parser.add_argument("--json", help="write the own-runs comparison here")
    args = parser.parse_args(argv)
    published()
    if args.layer_times or args.benchmarks:
        own_runs(args.layer_times, args.cluster, args.json, args.benchmarks)


if __name__ == "__main__":
    main()
