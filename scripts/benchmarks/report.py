#!/usr/bin/env python
"""Writes the Markdown summary of the benchmark results (every ratio, with machine information).

    python scripts/benchmarks/report.py [--out bench_results] [--write docs/performance.md]

Reads the JSON files the benchmarks wrote to --out. Without --write the Markdown goes to stdout.
With --write, only the part between the markers ``<!-- benchmarks:begin -->`` and
``<!-- benchmarks:end -->`` of that file is replaced (the file is created with the markers if it
does not exist), so hand-written analysis around it is kept.
"""
import argparse
import json
import os
import sys

import bench_common as bc

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
ORDER = ["local_kernels", "prefill_exchange", "decode_latency", "prefill_memory",
         "expert_compute", "end_to_end", "bound_independence", "lm_decode",
         "quantized_dispatch", "load_balance"]


def load(out_dir):
    results = {}
    for name in ORDER:
        path = os.path.join(out_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                results[name] = json.load(handle)
    return results


def fmt(value, digits=2):
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}"


def verdict(met):
    return "met" if met else "**not met**"


def token_rows_table(entries):
    """The float32 / bfloat16 / int8 token rows table (quantized_dispatch.py's rows)."""
    return bc.table(["transport", "ranks", "what", "hidden", "rows", "tokens/rank", "ms",
                     "payload GB/s", "x float32", "x bfloat16"],
                    [[x["transport"], x["ranks"], x["what"], x["hidden"], x["rows"],
                      x["tokens_per_rank"], fmt(x["time_s"] * 1e3, 3), fmt(x["payload_gbps"]),
                      fmt(x["speedup_vs_float32"]), fmt(x["speedup_vs_bfloat16"])]
                     for x in entries])


def target_rows(results):
    """[benchmark, what, target, measured, verdict] for every target."""
    rows = []
    if "local_kernels" in results:
        s = results["local_kernels"]["summary"]
        worst = s.get("worst_case") or {}
        rows.append(["local_kernels", "dispatch/combine bandwidth vs memcpy, hidden >= 1024 "
                     f"(worst: {worst.get('kernel')} {worst.get('dtype')} H={worst.get('hidden')})",
                     ">= 0.8x", fmt(s["min_ratio_hidden_ge_1024"]) + "x", verdict(s["met"])])
    if "prefill_exchange" in results:
        s = results["prefill_exchange"]["summary"]
        rows.append(["prefill_exchange", "ExchangeRows GB/s per rank vs gloo all_to_all_single "
                     "(worst of 2/4 ranks, 4-64 MiB)", ">= 3x",
                     fmt(s["min_ratio_vs_gloo"]) + "x", verdict(s["met_vs_gloo"])])
        rows.append(["prefill_exchange", "ExchangeRows vs single-copy bound (worst)", ">= 0.5x",
                     fmt(s["min_ratio_vs_single_copy_bound"]) + "x",
                     verdict(s["met_vs_single_copy_bound"])])
    if "decode_latency" in results:
        s = results["decode_latency"]["summary"]
        rows.append(["decode_latency", "fused round trip latency vs prefill path (worst of "
                     "1/16/128 tokens, H 2048/7168)", "<= 0.6x",
                     fmt(s["max_ratio_vs_prefill_path"]) + "x", verdict(s["met_vs_prefill_path"])])
        rows.append(["decode_latency", "fused round trip latency vs gloo exchange (worst)",
                     "<= 0.2x", fmt(s["max_ratio_vs_gloo"]) + "x", verdict(s["met_vs_gloo"])])
    if "prefill_memory" in results:
        s = results["prefill_memory"]["summary"]
        shape = s["shape"]
        rows.append(["prefill_memory", f"inference peak vs dense index-based (T="
                     f"{shape['tokens_per_rank']}, H={shape['hidden']}; vs GShard einsum "
                     f"{fmt(s['ratio_inference_vs_gshard'])}x; kept for backward: "
                     f"{fmt(s['ratio_kept_recompute_vs_dense'])}x recompute_experts, "
                     f"{fmt(s['ratio_kept_grouped_vs_dense'])}x grouped)",
                     "<= 0.5x", fmt(s["ratio_inference_vs_dense"]) + "x", verdict(s["met"])])
    if "expert_compute" in results:
        s = results["expert_compute"]["summary"]
        rows.append(["expert_compute", "bf16 grouped experts tokens/s vs float32 BatchMatMul "
                     f"(float32 grouped: {fmt(s['ratio_f32'])}x)", ">= 3x",
                     fmt(s["ratio_bf16"]) + "x", verdict(s["met"])])
    if "end_to_end" in results:
        what = {"train_vs_fairscale": "training step vs fairscale MOELayer",
                "train_vs_torch_ep": "training step vs PyTorch index-based EP",
                "train_of_bound": "training step / its compute bound",
                "prefill_vs_torch_ep": "prefill vs PyTorch index-based EP",
                "decode_vs_torch_ep": "decode vs PyTorch index-based EP"}
        for target, name in what.items():
            verdicts = [v for v in results["end_to_end"]["summary"]["verdicts"]
                        if v["target"] == target]
            if not verdicts:
                continue
            values = ", ".join(f"{fmt(v['value'])} (T={v['tokens_per_rank']})"
                               for v in verdicts)
            rows.append(["end_to_end", f"{name}, EP 4, as a user runs it",
                         verdicts[0]["goal"], values,
                         verdict(all(v["met"] for v in verdicts))])
    if "bound_independence" in results:
        for phase, r in results["bound_independence"]["results"].items():
            rows.append(["bound_independence", f"512-token {phase} step, default bound (4096) "
                         f"vs bound 512", "<= 1.05x", fmt(r["ratio"]) + "x", verdict(r["met"])])
    if "lm_decode" in results:
        r = results["lm_decode"]
        if "fused_over_prefill_path" in r:
            rows.append(["lm_decode", "whole-model decode tokens/s at EP 4, fused decode "
                         "operators vs decode through the prefill path", ">= 1.2x",
                         fmt(r["fused_over_prefill_path"]) + "x", verdict(r["target_met"])])
        if "fused_over_torch" in r:
            rows.append(["lm_decode", "whole-model decode tokens/s at EP 4, fused decode "
                         "operators vs the same model in PyTorch (all-to-all-v over gloo)",
                         "> 1x", fmt(r["fused_over_torch"]) + "x",
                         verdict(r["target_vs_torch_met"])])
        heavy = r.get("exchange_heavy")
        if heavy:
            rows.append(["lm_decode", f"the first row on the exchange-heavy variant "
                         f"({', '.join(heavy['set'])}, {heavy['sequences_per_rank']} sequences "
                         f"per rank)", ">= 1.2x", fmt(heavy["fused_over_prefill_path"]) + "x",
                         verdict(heavy["target_met"])])
    if "quantized_dispatch" in results:
        summary = results["quantized_dispatch"]["summary"]
        goals = {"prefill_int8_vs_float32": "int8 prefill exchange vs float32 rows",
                 "prefill_int8_vs_bfloat16": "int8 prefill exchange vs bfloat16 rows "
                                             "(bfloat16 layer)",
                 "decode_int8_vs_float32": "int8 decode round trip vs float32 rows"}
        for name, item in summary.items():
            if name == "hidden" or item["worst_over_ranks"] is None:
                continue
            transport = "AllGather" if name.endswith("_allgather") else "shared memory"
            goal = goals[name.replace("_allgather", "")]
            rows.append(["quantized_dispatch", f"{goal}, {transport}, hidden "
                         f"{summary['hidden']} (worst of EP 2 / 4)", item["target"],
                         fmt(item["worst_over_ranks"]) + "x", verdict(item["met"])])
    if "load_balance" in results:
        for group, item in sorted(results["load_balance"]["summary"].items()):
            rows.append(["load_balance", f"{group.upper()}: rank max/mean with one redundant "
                         f"slot per rank, worst skew", "<= 1.10",
                         fmt(item["redundant_max_over_mean_worst"]),
                         verdict(item["max_over_mean_met"])])
            if item["prefill_speedup_zipf_1.2"] is not None:
                rows.append(["load_balance", f"{group.upper()}: prefill step, redundant slots "
                             f"vs static placement, Zipf 1.2", ">= 1.3x",
                             fmt(item["prefill_speedup_zipf_1.2"]) + "x",
                             verdict(item["prefill_speedup_met"])])
    return rows


def machine_section(results):
    infos = {name: r["machine"] for name, r in results.items()}
    first = next(iter(infos.values()))
    flags = ", ".join(f for f, present in first["cpu_flags"].items() if present)
    absent = ", ".join(f for f, present in first["cpu_flags"].items() if not present)
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items() if v)
    loads = ", ".join(f"{name} {info['load_average_1m_at_start']:.1f}"
                      for name, info in infos.items())
    return "\n".join([
        f"- CPU: {first['cpu_model']}, {first['usable_cores']} usable cores, "
        f"{first['memory_bytes'] / 2 ** 30:.0f} GiB, kernel {first['kernel']}",
        f"- CPU flags present: {flags}; absent: {absent}",
        f"- Versions: Python {first['python']}, {versions}",
        f"- Repository revision: {first.get('git_revision')}; run at {first['date_utc']}",
        f"- 1-minute load average when each benchmark started: {loads} "
        "(other jobs shared the machine: compare figures within one run only)",
    ])


def details(results):
    parts = []
    if "local_kernels" in results:
        r = results["local_kernels"]
        rows = [[x["method"], x["kernel"], x["dtype"], x["hidden"], x["threads"],
                 fmt(x["kernel_gbps"]), fmt(x["memcpy_gbps"]), fmt(x["ratio_vs_memcpy"])]
                for x in r["rows"]]
        parts.append("### local_kernels\n\n"
                     f"T={r['config']['tokens']} tokens, top-{r['config']['top_k']} of "
                     f"{r['config']['experts']} experts. GB/s of distinct bytes read + written; "
                     "`direct` = C entry point through ctypes, `graph` = the Cells in a "
                     "GRAPH_MODE loop.\n\n" + bc.table(
                         ["method", "kernel", "dtype", "hidden", "threads", "kernel GB/s",
                          "memcpy GB/s", "ratio"], rows))
    if "prefill_exchange" in results:
        r = results["prefill_exchange"]
        rows = [[x["ranks"], x["bytes_per_rank"] >> 20, x["slot"], fmt(x["exchange_gbps"]),
                 fmt(x["gloo_gbps"]), fmt(x["single_copy_bound_gbps"]),
                 fmt(x.get("process_vm_readv_bound_gbps", float("nan"))),
                 fmt(x["ratio_vs_gloo"]), fmt(x["ratio_vs_single_copy_bound"]),
                 fmt(x.get("ratio_vs_process_vm_readv_bound", float("nan")))]
                for x in r["rows"]]
        parts.append("### prefill_exchange\n\nGB/s per rank (float32 rows of 4 KiB, every "
                     "block full). Targets are judged on the `one peer block` slot, MoELayer's "
                     "default window sizing. The readv bound (informative) is the single-copy "
                     "bound with the bandwidth of the kernel's copy routine (process_vm_readv "
                     "within one process) in place of memcpy's.\n\n" + bc.table(
                         ["ranks", "MiB/rank", "window slot", "ExchangeRows", "gloo",
                          "1-copy bound", "readv bound", "x gloo", "x bound", "x readv bound"],
                         rows))
        if r.get("token_rows"):
            parts.append("Token rows through the layer's prefill exchange (float32, bfloat16 "
                         "and int8 rows; `dispatch.quant: int8`):\n\n"
                         + token_rows_table(r["token_rows"]))
    if "decode_latency" in results:
        r = results["decode_latency"]
        rows = [[x["hidden"], x["tokens_per_rank"], fmt(x["fused_us"], 0),
                 fmt(x.get("fused_grouped_us"), 0), fmt(x["prefill_path_us"], 0),
                 fmt(x["gloo_us"], 0), fmt(x["fused_over_prefill_path"]),
                 fmt(x["fused_over_gloo"]), fmt(x.get("fused_grouped_over_gloo")),
                 fmt(x.get("cpu_fused_over_prefill_path")), fmt(x.get("cpu_fused_over_gloo")),
                 fmt(x["layer_decode_us"], 0), fmt(x.get("layer_decode_grouped_us"), 0),
                 fmt(x["layer_prefill_us"], 0)]
                for x in r["rows"]]
        parts.append("### decode_latency\n\nRound trip (dispatch + identity experts + combine) "
                     f"in microseconds, EP {r['config']['ranks']}, top-{r['config']['top_k']} of "
                     f"{r['config']['experts']}, max_tokens_per_rank "
                     f"{r['config']['max_tokens_per_rank']}. `fused`: the row-wise pair the layer "
                     "decodes with (FusedDeliver + FusedReturn, one row per (token, rank)); "
                     "`fused grouped`: FusedDispatch + FusedCombine (CANN's contract, one row "
                     "per (token, expert) grouped by expert). Whole layer (expert width "
                     f"{r['config']['expert_ffn_size_for_layer']}) in the last three columns. "
                     "`CPU` ratios: CPU time per round trip and rank (less disturbed by other "
                     "jobs than wall time).\n\n"
                     + bc.table(["hidden", "tokens/rank", "fused", "fused grouped",
                                 "prefill path", "gloo", "fused/prefill", "fused/gloo",
                                 "grouped/gloo", "CPU fused/prefill", "CPU fused/gloo",
                                 "layer decode", "layer decode grouped", "layer prefill"], rows))
        if r.get("token_rows"):
            parts.append("Token rows through the fused decode round trip (float32, bfloat16 "
                         "and int8 rows out, the compute dtype back):\n\n"
                         + token_rows_table(r["token_rows"]))
    if "quantized_dispatch" in results:
        parts.append("### quantized_dispatch\n\n" + token_rows_table(
            results["quantized_dispatch"]["rows"]))
    if "prefill_memory" in results:
        r = results["prefill_memory"]
        designs = list(r["analytic"][0]["designs"])
        rows = [[a["tokens_per_rank"], a["hidden"], a["ffn"], a["routing"]["dense_capacity"]]
                + [fmt(a["designs"][d]["inference_peak"] / 2 ** 20, 0) for d in designs]
                + [fmt(a["ratio_inference_vs_dense"]), fmt(a["ratio_inference_vs_gshard"]),
                   fmt(a["ratio_kept_recompute_vs_dense"]), fmt(a["ratio_kept_grouped_vs_dense"])]
                for a in r["analytic"]]
        measured = [[m["tokens_per_rank"], m["hidden"], m["ffn"],
                     fmt(m["sparse_rowwise_peak_growth_bytes"] / 2 ** 20, 0),
                     fmt(m["analytic_rowwise_bytes"] / 2 ** 20, 0),
                     fmt(m["sparse_grouped_peak_growth_bytes"] / 2 ** 20, 0),
                     fmt(m["analytic_grouped_bytes"] / 2 ** 20, 0),
                     fmt((m["dense_gshard_peak_growth_bytes"] or float("nan")) / 2 ** 20, 0),
                     fmt(m["analytic_gshard_bytes"] / 2 ** 20, 0),
                     fmt(m["sparse_train_grouped_peak_growth_bytes"] / 2 ** 20, 0),
                     fmt(m["sparse_train_recompute_peak_growth_bytes"] / 2 ** 20, 0)]
                    for m in r["measured"]]
        parts.append("### prefill_memory\n\nInference peak of live buffers, MiB per rank, EP 4, "
                     "top-8 of 64, float32 (analytic; the last two columns: bytes kept for "
                     "backward in training, vs the dense layout).\n\n" + bc.table(
                         ["T/rank", "H", "F", "dense c"] + [f"{d} MiB" for d in designs]
                         + ["row-wise/dense", "row-wise/GShard", "kept: recompute/dense",
                            "kept: grouped/dense"], rows)
                     + "\n\nMeasured peak RSS growth of one prefill forward, and of one "
                     "training forward + backward (MiB):\n\n"
                     + bc.table(["T/rank", "H", "F", "row-wise (MindSpore)", "analytic",
                                 "grouped (MindSpore)", "analytic", "dense GShard (PyTorch)",
                                 "analytic", "training: grouped", "training: recompute_experts"],
                                measured))
    if "expert_compute" in results:
        r = results["expert_compute"]
        c = r["config"]
        rows = [[name, fmt(x["seconds"] * 1e3, 1), fmt(x["gflops"], 1),
                 fmt(x["fraction_of_peak"]), fmt(x["ratio_vs_batchmatmul_f32"])]
                for name, x in r["results"].items()]
        peaks = ", ".join(f"{k} {v:.1f}" for k, v in r["peak_gflops"].items())
        evidence = ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}"
                             for k, v in r["bf16_evidence"].items())
        parts.append(f"### expert_compute\n\n{c['experts']} experts x {c['rows_per_expert']} "
                     f"rows, H={c['hidden']}, F={c['ffn']}, {c['threads']} threads.\n\n"
                     + bc.table(["implementation", "ms/call", "GFLOP/s", "of peak",
                                 "x BatchMatMul f32"], rows)
                     + f"\n\nPeak float32 GEMM (GFLOP/s): {peaks}.\n\nbfloat16 evidence: "
                     f"{evidence}.")
    if "end_to_end" in results:
        r = results["end_to_end"]
        c = r["config"]
        rows = [[row["phase"], row["tokens_per_rank"], fmt(row["ours_ms"], 1),
                 fmt(row["torch_ep_ms"], 1), fmt(row["fairscale_ms"], 1),
                 fmt(row["vs_torch_ep"]), fmt(row["vs_fairscale"]),
                 fmt(row["compute_bound_ms"], 1), fmt(row["of_bound"])] for row in r["rows"]]
        parts.append(f"### end_to_end\n\nEP {c['ranks']}, {c['experts']} experts, top-"
                     f"{c['top_k']}, H={c['hidden']}, F={c['ffn']}, {c['dtype']}; ours: "
                     f"{c['ours']}; PyTorch {c['torch_threads_per_process']} thread per "
                     f"process. Milliseconds per step (slowest rank's best).\n\n"
                     + bc.table(["phase", "T/rank", "ours ms", "PyTorch EP ms",
                                 "fairscale ms", "x PyTorch EP", "x fairscale", "bound ms",
                                 "of bound"], rows))
    return "\n\n".join(parts)


def render(results, out_dir):
    if not results:
        return f"No benchmark results found in {out_dir}/."
    quick = any(r.get("config", {}).get("quick") for r in results.values())
    lines = ["## Measured results", "",
             "Generated by `python scripts/benchmarks/report.py` from the JSON files of "
             "`python scripts/benchmarks/run_all.py`" + (" (quick mode)" if quick else "")
             + ".", "", "### Machine", "", machine_section(results), "",
             "### Targets", "",
             bc.table(["benchmark", "what", "target", "measured", "verdict"],
                      target_rows(results)), "", details(results)]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=bc.DEFAULT_OUT, help="directory of the JSON results")
    parser.add_argument("--write", default=None,
                        help="Markdown file whose benchmarks section is replaced")
    args = parser.parse_args(argv)
    text = render(load(args.out), args.out)
    if not args.write:
        print(text)
        return 0
    block = f"{BEGIN}\n{text}\n{END}"
    if os.path.exists(args.write):
        with open(args.write, encoding="utf-8") as handle:
            current = handle.read()
        if BEGIN in current and END in current:
            updated = current[:current.index(BEGIN)] + block + current[current.index(END)
                                                                        + len(END):]
        else:
            updated = current.rstrip() + "\n\n" + block + "\n"
    else:
        updated = "# Performance\n\n" + block + "\n"
    with open(args.write, "w", encoding="utf-8") as handle:
        handle.write(updated)
    print(f"[report] wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
