#!/usr/bin/env python
"""Decode latency: fused Dispatch + Combine vs the prefill path and vs a gloo exchange, at EP 4.

    python scripts/benchmarks/decode_latency.py [--quick] [--out DIR]

4 msrun workers (expert parallelism 4), 64 experts (16 per rank), top-8 routing drawn at random
(8 distinct experts per token, normalised weights), hidden 2048 and 7168, float32, 1, 16 and 128
tokens per rank, ``dispatch.max_tokens_per_rank`` = 128 (the largest decode step, as a decode
deployment would size it).

- ``fused``: the decode path ``MoELayer`` takes (``dispatch.decode_layout: rowwise``):
  ``layer.decode_dispatcher.deliver`` / ``return_rows`` (FusedDeliver + FusedReturn), one row
  per (token, rank) each way. Identity experts: the delivered rows go straight back (the
  row-wise experts kernel applies the routing weights as it writes its partial sums, so a
  layer has no separate weighting pass);
- ``fused grouped``: ``layer.decode_dispatcher.dispatch`` / ``combine`` (FusedDispatch +
  FusedCombine, CANN's contract: one row per (token, expert) pair grouped by expert, the
  weights applied in the Combine) with identity experts: ``combine(dispatch(x))``;
- ``prefill path``: the same round trip through ``layer.prefill_dispatcher`` (sparse
  all-to-all-v: layout, gather, three ExchangeRows, local dispatch and combine), i.e. the
  unfused path a layer would use for decode without the fused operators;
- ``gloo``: PyTorch CPU, 4 processes: the same rows (each token once per destination rank)
  packed with index_select, counts ``all_to_all_single``, rows ``all_to_all_single``, the rows
  sent back with another ``all_to_all_single`` and summed per token with index_add -- the
  round trip of a minimal all-to-all-v MoE exchange over gloo;
- ``layer``: the whole ``MoELayer`` (router, experts of width 256, shared expert) in decode
  phase (row-wise, and with ``decode_layout: grouped``) and prefill phase, one graph launch per
  call.

The round trips run N times per GRAPH_MODE launch (chained with ``ops.depend``) so the ~150 us
launch is amortised; ``per launch`` columns give one round trip per launch. Latency = the
slowest rank's best repetition (each repetition starts after a barrier). Also recorded: CPU
time per round trip (the process's, every thread, mean over ranks and repetitions), whose
ratios other jobs on the machine disturb less than the wall times'.
Targets: fused <= 0.6x the prefill path; fused <= 0.2x gloo.

A second table, ``token rows``: the decode round trip of the fused pair (``deliver`` as the
layer calls it in inference + ``return_rows``, 128 tokens per rank) with float32, bfloat16 and
int8 rows (``dispatch.quant: int8``; the return trip stays in the compute dtype) at hidden 2048
and 7168, EP 2 and 4: time per round trip, payload GB/s, speed-ups over float32 / bfloat16 rows
(``quantized_dispatch.py``'s measurement, shared-memory window). ``--no-token-rows`` leaves it
out.
"""
import os
import sys
import time

import numpy as np

import bench_common as bc
import quantized_dispatch

NAME = "decode_latency"
WORLD = 4
EXPERTS, TOP_K, MAX_TOKENS, EXPERT_FFN = 64, 8, 128, 256


def settings(quick):
    """(hiddens, tokens per rank, repeats, round trips per launch)."""
    if quick:
        return [2048], [1, 128], 3, 2
    return [2048, 7168], [1, 16, 128], 5, 4


# ---- MindSpore worker ------------------------------------------------------------------------

def ms_worker(quick):
    from mindspore import Tensor, nn, ops
    import mindspore_moe_ep as mee

    rank = bc.start_mindspore("graph", distributed=True)
    hiddens, token_counts, repeats, calls = settings(quick)

    barrier = bc.world_barrier

    class RoundTrip(nn.Cell):
        """``calls`` round trips with identity experts, grouped (dispatch / combine) or row-wise
        (deliver / return_rows)."""

        def __init__(self, dispatcher, calls, rowwise):
            super().__init__()
            self.dispatcher, self.calls, self.rowwise = dispatcher, calls, rowwise

        def construct(self, x, ids, weights):
            y = x
            for _ in range(self.calls):
                if self.rowwise:
                    rows, _, _, row_counts, route = self.dispatcher.deliver(x, ids, weights)
                    y = self.dispatcher.return_rows(rows, row_counts, route)
                else:
                    rows, _, _, handle = self.dispatcher.dispatch(x, ids, weights)
                    y = self.dispatcher.combine(rows, handle)
                x = ops.depend(x, y)
            return y

    def timed(cell, inputs, inner):
        """(best, median) wall seconds per round trip, and this process's CPU seconds per
        round trip over all repetitions (every thread; less disturbed by other jobs)."""
        cell(*inputs).asnumpy()  # compile
        samples, cpu = [], 0.0
        for _ in range(repeats):
            barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            cell(*inputs).asnumpy()
            samples.append((time.perf_counter() - start) / inner)
            cpu += time.process_time() - cpu_start
        return min(samples), float(np.median(samples)), cpu / (repeats * inner)

    results = []
    for hidden in hiddens:
        def config_of(layout, hidden=hidden):
            return mee.MoEConfig.from_dict({
                "model": {"hidden_size": hidden, "num_experts": EXPERTS,
                          "expert_ffn_size": EXPERT_FFN, "num_shared_experts": 1},
                "router": {"top_k": TOP_K, "score_func": "sigmoid", "num_groups": 8,
                           "topk_groups": 4, "routed_scaling_factor": 2.5},
                "parallel": {"expert_parallel": WORLD},
                "dispatch": {"max_tokens_per_rank": MAX_TOKENS,
                             "decode_token_threshold": MAX_TOKENS, "transport": "shm",
                             "decode_layout": layout},
                "runtime": {"mode": "graph", "dtype": "float32"}})
        layers = {layout: mee.MoELayer(config_of(layout)) for layout in ("rowwise", "grouped")}
        layer = layers["rowwise"]
        for each in layers.values():
            each.set_train(False)
        assert layer.decode_dispatcher is not None, "the fused decode dispatcher is missing"
        assert layer.experts_path(MAX_TOKENS, "decode") == "rowwise"
        assert layers["grouped"].experts_path(MAX_TOKENS, "decode") == "grouped"
        paths = {"fused": (layer.decode_dispatcher, True),
                 "fused grouped": (layer.decode_dispatcher, False),
                 "prefill path": (layer.prefill_dispatcher, False)}
        for tokens in token_counts:
            ids_np, weights_np = bc.random_routing(tokens, TOP_K, EXPERTS,
                                                   seed=1000 * rank + tokens)
            x = Tensor(np.random.default_rng(rank).standard_normal((tokens, hidden),
                                                                   dtype=np.float32))
            inputs = (x, Tensor(ids_np), Tensor(weights_np))
            for path, (dispatcher, rowwise) in paths.items():
                amortised = timed(RoundTrip(dispatcher, calls, rowwise), inputs, calls)
                single = (timed(RoundTrip(dispatcher, 1, rowwise), inputs, 1) if not quick
                          else (None, None, None))
                results.append({"what": "round trip", "path": path, "hidden": hidden,
                                "tokens": tokens, "min_s": amortised[0],
                                "median_s": amortised[1], "cpu_s": amortised[2],
                                "per_launch_min_s": single[0], "calls_per_launch": calls})
            for name, each, phase in (("decode", layer, "decode"),
                                      ("decode grouped", layers["grouped"], "decode"),
                                      ("prefill", layer, "prefill")):
                best, median, cpu = timed(each, (x, phase), 1)  # the phase: a graph constant
                results.append({"what": "layer", "path": name, "hidden": hidden,
                                "tokens": tokens, "min_s": best, "median_s": median,
                                "cpu_s": cpu, "per_launch_min_s": best, "calls_per_launch": 1})
        del layer, layers
    bc.write_worker_result({"rank": rank, "results": results})


# ---- PyTorch worker --------------------------------------------------------------------------

def torch_worker(quick):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    hiddens, token_counts, repeats, calls = settings(quick)
    experts_per_rank = EXPERTS // world
    results = []
    for hidden in hiddens:
        for tokens in token_counts:
            ids_np, weights_np = bc.random_routing(tokens, TOP_K, EXPERTS,
                                                   seed=1000 * rank + tokens)
            x = torch.from_numpy(np.random.default_rng(rank).standard_normal(
                (tokens, hidden), dtype=np.float32))
            ids, weights = torch.from_numpy(ids_np).long(), torch.from_numpy(weights_np)

            def round_trip(x):
                destination = ids // experts_per_rank                        # [T, K]
                # one row per (token, destination rank), tokens in order within a rank
                goes = torch.zeros(tokens, world, dtype=torch.bool)
                goes[torch.arange(tokens).unsqueeze(1).expand(-1, TOP_K), destination] = True
                pair_weight = torch.zeros(tokens, world)
                pair_weight.index_put_((torch.arange(tokens).unsqueeze(1).expand(-1, TOP_K),
                                        destination), weights, accumulate=True)
                rank_of_row, token_of_row = goes.t().nonzero(as_tuple=True)
                send_counts = torch.bincount(rank_of_row, minlength=world)
                recv_counts = torch.empty_like(send_counts)
                dist.all_to_all_single(recv_counts, send_counts)
                send = x.index_select(0, token_of_row)
                recv = torch.empty(int(recv_counts.sum()), hidden)
                dist.all_to_all_single(recv, send, recv_counts.tolist(), send_counts.tolist())
                back = torch.empty_like(send)  # identity experts: send the rows back
                dist.all_to_all_single(back, recv, send_counts.tolist(), recv_counts.tolist())
                y = torch.zeros(tokens, hidden)
                y.index_add_(0, token_of_row,
                             back * pair_weight[token_of_row, rank_of_row].unsqueeze(1))
                return y

            round_trip(x)
            samples, cpu = [], 0.0
            for _ in range(repeats):
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    round_trip(x)
                samples.append((time.perf_counter() - start) / calls)
                cpu += time.process_time() - cpu_start
            results.append({"what": "round trip", "path": "gloo", "hidden": hidden,
                            "tokens": tokens, "min_s": min(samples),
                            "median_s": float(np.median(samples)),
                            "cpu_s": cpu / (repeats * calls), "per_launch_min_s": None,
                            "calls_per_launch": calls})
    dist.destroy_process_group()
    bc.write_worker_result({"rank": rank, "results": results})


# ---- parent ----------------------------------------------------------------------------------

def merge(reports):
    merged = {}
    for report in reports:
        for entry in report["results"]:
            key = (entry["what"], entry["path"], entry["hidden"], entry["tokens"])
            current = merged.setdefault(key, dict(entry, cpu_s_total=0.0, ranks=0))
            for field in ("min_s", "median_s", "per_launch_min_s"):
                if entry[field] is not None:
                    current[field] = max(current[field], entry[field])
            current["cpu_s_total"] += entry["cpu_s"]  # CPU time: the mean over ranks
            current["ranks"] += 1
    return merged


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    parser.add_argument("--no-token-rows", action="store_true",
                        help="leave out the float32 / bfloat16 / int8 token rows table")
    args = parser.parse_args(argv)
    if args.role == "ms":
        return ms_worker(args.quick)
    if args.role == "torch":
        return torch_worker(args.quick)

    hiddens, token_counts, repeats, calls = settings(args.quick)
    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print(f"[{NAME}] torch is not installed: the gloo comparison is skipped", flush=True)
    threads = bc.threads_per_process(WORLD)
    environment = {"MOE_EP_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads),
                   "OMP_NUM_THREADS": str(threads)}
    script = os.path.abspath(__file__)
    extra = ["--quick"] if args.quick else []
    row_ranks = [] if args.no_token_rows else [2, WORLD]
    progress = bc.Progress(NAME, (2 if have_torch else 1) + len(row_ranks))
    merged = merge(bc.launch_msrun(script, WORLD, ["--role", "ms", *extra], env=environment))
    progress.step(f"MindSpore, {WORLD} msrun workers")
    if have_torch:
        merged.update(merge(bc.launch_processes(script, WORLD, ["--role", "torch", *extra],
                                                env=environment)))
        progress.step(f"gloo, {WORLD} processes")

    def get(what, path, hidden, tokens, field="min_s"):
        entry = merged.get((what, path, hidden, tokens))
        return entry[field] if entry and entry[field] is not None else float("nan")

    def cpu_per_rank(path, hidden, tokens):
        entry = merged.get(("round trip", path, hidden, tokens))
        return entry["cpu_s_total"] / entry["ranks"] if entry else float("nan")

    entries, rows = [], []
    for hidden in hiddens:
        for tokens in token_counts:
            fused = get("round trip", "fused", hidden, tokens)
            grouped = get("round trip", "fused grouped", hidden, tokens)
            unfused = get("round trip", "prefill path", hidden, tokens)
            gloo = get("round trip", "gloo", hidden, tokens)
            cpu = {path: cpu_per_rank(path, hidden, tokens)
                   for path in ("fused", "fused grouped", "prefill path", "gloo")}
            entry = {"hidden": hidden, "tokens_per_rank": tokens,
                     "cpu_us_per_rank": {path: value * 1e6 for path, value in cpu.items()},
                     "cpu_fused_over_prefill_path": cpu["fused"] / cpu["prefill path"],
                     "cpu_fused_over_gloo": cpu["fused"] / cpu["gloo"],
                     "fused_us": fused * 1e6, "fused_grouped_us": grouped * 1e6,
                     "prefill_path_us": unfused * 1e6, "gloo_us": gloo * 1e6,
                     "fused_per_launch_us": get("round trip", "fused", hidden, tokens,
                                                "per_launch_min_s") * 1e6,
                     "prefill_path_per_launch_us": get("round trip", "prefill path", hidden,
                                                       tokens, "per_launch_min_s") * 1e6,
                     "layer_decode_us": get("layer", "decode", hidden, tokens) * 1e6,
                     "layer_decode_grouped_us": get("layer", "decode grouped", hidden,
                                                    tokens) * 1e6,
                     "layer_prefill_us": get("layer", "prefill", hidden, tokens) * 1e6,
                     "fused_over_prefill_path": fused / unfused, "fused_over_gloo": fused / gloo,
                     "fused_over_fused_grouped": fused / grouped,
                     "fused_grouped_over_gloo": grouped / gloo}
            entries.append(entry)
            rows.append([hidden, tokens, entry["fused_us"], entry["fused_grouped_us"],
                         entry["prefill_path_us"], entry["gloo_us"],
                         entry["fused_over_prefill_path"], entry["fused_over_gloo"],
                         entry["fused_grouped_over_gloo"], entry["cpu_fused_over_prefill_path"],
                         entry["cpu_fused_over_gloo"], entry["layer_decode_us"],
                         entry["layer_decode_grouped_us"], entry["layer_prefill_us"]])
    print(bc.table(["hidden", "tokens/rank", "fused us", "fused grouped us", "prefill path us",
                    "gloo us", "fused/prefill", "fused/gloo", "grouped/gloo",
                    "CPU fused/prefill", "CPU fused/gloo", "layer decode us",
                    "layer decode grouped us", "layer prefill us"], rows))
    worst_unfused = max(e["fused_over_prefill_path"] for e in entries)
    worst_gloo = max(e["fused_over_gloo"] for e in entries)
    summary = {"target_vs_prefill_path": "<= 0.6x", "max_ratio_vs_prefill_path": worst_unfused,
               "met_vs_prefill_path": bool(worst_unfused <= 0.6),
               "target_vs_gloo": "<= 0.2x", "max_ratio_vs_gloo": worst_gloo,
               "met_vs_gloo": bool(worst_gloo <= 0.2)}
    print(f"[{NAME}] worst case: fused = {worst_unfused:.2f}x the prefill path (target <= 0.6), "
          f"{worst_gloo:.2f}x gloo (target <= 0.2)", flush=True)
    token_rows = []
    if row_ranks:
        token_rows, table_rows = quantized_dispatch.measure_row_formats(
            row_ranks, ["shm"], args.quick, what=("decode",), progress=progress)
        print(f"[{NAME}] token rows through the fused decode round trip:", flush=True)
        print(bc.table(quantized_dispatch.ROW_FORMAT_HEADER, table_rows))
    bc.write_results(args.out, NAME, {
        "config": {"ranks": WORLD, "experts": EXPERTS, "top_k": TOP_K, "hiddens": hiddens,
                   "tokens_per_rank": token_counts, "max_tokens_per_rank": MAX_TOKENS,
                   "expert_ffn_size_for_layer": EXPERT_FFN, "dtype": "float32",
                   "repeats": repeats, "calls_per_launch": calls,
                   "threads_per_process": threads, "quick": args.quick},
        "method": __doc__.split("\n\n", 2)[2], "rows": entries, "summary": summary,
        "token_rows": token_rows})
    if not args.no_plot:
        def draw(plt):
            for hidden, color in zip(hiddens, ("tab:blue", "tab:orange")):
                points = [e for e in entries if e["hidden"] == hidden]
                tokens = [e["tokens_per_rank"] for e in points]
                plt.plot(tokens, [e["fused_us"] for e in points], "-o", color=color,
                         label=f"fused H={hidden}")
                plt.plot(tokens, [e["fused_grouped_us"] for e in points], "-.d", color=color,
                         label=f"fused grouped H={hidden}")
                plt.plot(tokens, [e["prefill_path_us"] for e in points], "--s", color=color,
                         label=f"prefill path H={hidden}")
                plt.plot(tokens, [e["gloo_us"] for e in points], ":^", color=color,
                         label=f"gloo H={hidden}")
            plt.xscale("log", base=2)
            plt.yscale("log")
            plt.xlabel("tokens per rank")
            plt.ylabel("round trip latency (us)")
            plt.title(f"Decode dispatch+combine round trip, EP {WORLD}, top-{TOP_K} of {EXPERTS}")
            plt.legend(fontsize=7)
        bc.save_plot(args.out, NAME, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
