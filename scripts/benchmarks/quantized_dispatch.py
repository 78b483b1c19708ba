#!/usr/bin/env python
"""Quantized dispatch: token rows as float32, bfloat16 and int8 (``dispatch.quant: int8``) through
the prefill exchange and the decode round trip, EP 2 and 4.

    python scripts/benchmarks/quantized_dispatch.py [--quick] [--out DIR] [--ranks 2,4]
                                                     [--transports shm,allgather]

``prefill_exchange.py`` and ``decode_latency.py`` run the same measurement over the
shared-memory window (their "token rows" tables) through :func:`measure_row_formats`.

msrun workers (expert parallelism R = 2 and 4), 64 experts, top-8 routing drawn at random, hidden
2048 and 7168, ``MoELayer`` built as a user builds it (defaults), one layer per (transport,
hidden, rows). Transports: ``shm``, what a layer on one host uses (the shared-memory window:
every row is copied between processes' memory, so a row costs a memory copy), and
``allgather``, the fallback of ranks on several hosts (MindSpore's AllGather, every send buffer
to every rank: a transport bound by the bytes it moves). Rows:

- ``float32``: runtime.dtype float32, rows travel as float32 (4 bytes per value);
- ``bfloat16``: runtime.dtype bfloat16 (2 bytes per value);
- ``int8``: runtime.dtype float32 with ``dispatch.quant: int8`` (1 byte per value + a 4-byte
  scale per row, quantized at the source; as in the layer's inference, the rows stay int8 where
  they land and the experts dequantize them as they read them);
- ``int8 (bf16 layer)``: the same with runtime.dtype bfloat16 (the source reads 2 bytes per
  value to quantize them).

Measured, GRAPH_MODE, several calls per launch (chained with ``ops.depend``):

- ``prefill exchange``: ``layer.prefill_dispatcher.deliver`` as the layer calls it in inference,
  at 512 tokens per rank (the sparse all-to-all-v of the token rows: DeliverRows, each token row
  once per rank holding one of its experts, ~3.7 of 4 ranks at top-8 of 64);
- ``decode round trip``: the decode dispatcher's ``deliver`` (as in inference) + ``return_rows``
  of one partial sum per delivered row (a fixed tensor in the compute dtype: the experts'
  output, which the return moves unquantized) at 128 tokens per rank (FusedDeliver +
  FusedReturn over the window; the all-to-all-v over AllGather).

Time = the slowest rank's best repetition (each starts after a barrier). Effective payload GB/s =
payload rows x hidden x bytes per value of the compute dtype / time, the payload rows being the
most any rank has: in the prefill exchange the rows delivered to the rank (what its experts
receive), in the decode round trip twice the rows it sends (each token row once to every rank
holding one of its experts, and its partial sum back). Targets (same run; like for like, the same layer with and without int8
rows): int8 prefill exchange >= 2.5x faster than float32 and >= 1.5x faster than bfloat16 at
hidden 7168; int8 decode round trip >= 1.5x faster than float32 at 128 tokens per rank.
"""
import argparse
import os
import sys
import time

import numpy as np

import bench_common as bc

NAME = "quantized_dispatch"
EXPERTS, TOP_K = 64, 8
PREFILL_TOKENS, DECODE_TOKENS = 512, 128
WHAT = {"prefill": "prefill exchange", "decode": "decode round trip"}
VARIANTS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"),
            "int8": ("float32", "int8"), "int8 (bf16 layer)": ("bfloat16", "int8")}
TARGETS = {"prefill_int8_vs_float32": 2.5, "prefill_int8_vs_bfloat16": 1.5,
           "decode_int8_vs_float32": 1.5}


def settings(quick, transport):
    """(hiddens, repeats, calls per launch). AllGather steps take 0.1-5 s each: fewer."""
    hiddens = [7168] if quick else [2048, 7168]
    if transport == "allgather":
        return hiddens, 3, 1
    return (hiddens, 3, 2) if quick else (hiddens, 5, 4)


def ms_worker(quick, transport, what=tuple(WHAT)):
    from mindspore import Tensor, nn, ops
    from mindspore.communication import get_group_size
    import mindspore_moe_ep as mee
    from mindspore_moe_ep.runtime import mindspore_dtype

    rank = bc.start_mindspore("graph", distributed=True)
    world = get_group_size()
    hiddens, repeats, calls = settings(quick, transport)

    barrier = bc.world_barrier

    class Deliver(nn.Cell):
        """``calls`` prefill deliveries; returns the received counts, after the last delivery's
        rows (so that GRAPH_MODE cannot prune an exchange whose rows nobody reads)."""

        def __init__(self, dispatcher):
            super().__init__()
            self.dispatcher = dispatcher

        def construct(self, x, ids, weights, partial):
            counts, rows = None, None
            for _ in range(calls):
                rows, _, _, counts, _ = self.dispatcher.deliver(x, ids, weights, True)
                x = ops.depend(x, rows)
            return ops.depend(counts, rows), counts

    class RoundTrip(nn.Cell):
        """``calls`` decode round trips with identity experts."""

        def __init__(self, dispatcher):
            super().__init__()
            self.dispatcher = dispatcher

        def construct(self, x, ids, weights, partial):
            y = x
            for _ in range(calls):
                rows, _, _, counts, route = self.dispatcher.deliver(x, ids, weights, True)
                y = self.dispatcher.return_rows(ops.depend(partial, rows), counts, route)
                x = ops.depend(x, y)
            return y, y

    def timed(cell, inputs):
        out = cell(*inputs)[0].asnumpy()  # compile
        samples = []
        for _ in range(repeats):
            barrier()
            start = time.perf_counter()
            cell(*inputs)[0].asnumpy()
            samples.append((time.perf_counter() - start) / calls)
        return min(samples), float(np.median(samples)), out

    results = []
    for hidden in hiddens:
        for variant, (dtype, quant) in VARIANTS.items():
            layer = mee.MoELayer(mee.MoEConfig.from_dict({
                "model": {"hidden_size": hidden, "num_experts": EXPERTS, "expert_ffn_size": 64},
                "router": {"top_k": TOP_K},
                "parallel": {"expert_parallel": world},
                "dispatch": {"max_tokens_per_rank": PREFILL_TOKENS, "transport": transport,
                             "decode_token_threshold": DECODE_TOKENS, "quant": quant},
                "runtime": {"mode": "graph", "dtype": dtype}}))
            layer.set_train(False)
            assert layer.plan(PREFILL_TOKENS, "prefill").quantized == (quant == "int8")
            value_bytes = 4 if dtype == "float32" else 2
            for name in what:
                if name == "prefill":
                    tokens, cell = PREFILL_TOKENS, Deliver(layer.prefill_dispatcher)
                else:
                    tokens, cell = DECODE_TOKENS, RoundTrip(
                        layer.dispatcher_for(DECODE_TOKENS, "decode"))
                ids, weights = bc.random_routing(tokens, TOP_K, EXPERTS, seed=1000 * rank + tokens)
                x = Tensor(np.random.default_rng(rank).standard_normal(
                    (tokens, hidden), dtype=np.float32)).astype(mindspore_dtype(dtype))
                partial = Tensor(np.random.default_rng(rank).standard_normal(
                    (world * PREFILL_TOKENS, hidden), dtype=np.float32)).astype(
                        mindspore_dtype(dtype))
                best, median, out = timed(cell, (x, Tensor(ids), Tensor(weights), partial))
                if name == "prefill":  # the rows delivered to this rank
                    payload_rows = int(out.sum())
                else:  # each token row goes to every rank holding one of its experts and back
                    experts_per_rank = EXPERTS // world
                    payload_rows = 2 * sum(len(set(row // experts_per_rank)) for row in ids)
                results.append({"what": WHAT[name], "rows": variant, "hidden": hidden,
                                "transport": transport,
                                "tokens": tokens, "min_s": best, "median_s": median,
                                "payload_rows": payload_rows, "value_bytes": value_bytes})
            layer.close()
            del layer
    bc.write_worker_result({"rank": rank, "results": results})


def merge(reports):
    """Per (transport, what, rows, hidden): the slowest rank's best time, and the most payload
    rows of a rank."""
    merged = {}
    for report in reports:
        for entry in report["results"]:
            key = (entry["transport"], entry["what"], entry["rows"], entry["hidden"])
            current = merged.setdefault(key, dict(entry))
            current["min_s"] = max(current["min_s"], entry["min_s"])
            current["median_s"] = max(current["median_s"], entry["median_s"])
            current["payload_rows"] = max(current["payload_rows"], entry["payload_rows"])
    return merged


def measure_row_formats(ranks, transports, quick, what=tuple(WHAT), progress=None):
    """Runs the workers (one msrun launch per transport and world size) and returns
    (entries, table rows): per (transport, ranks, what, hidden, rows) the slowest rank's best
    time, payload GB/s and the speed-ups over float32 / bfloat16 rows of the same run."""
    rows, entries = [], []
    for transport, world in [(t, w) for t in transports for w in ranks]:
        threads = bc.threads_per_process(world)
        worker_args = ["--role", "ms", "--transport", transport, "--what", ",".join(what)] + (
            ["--quick"] if quick else [])
        merged = merge(bc.launch_msrun(os.path.abspath(__file__), world, worker_args,
                                       env={"MOE_EP_NUM_THREADS": str(threads),
                                            "OMP_NUM_THREADS": str(threads)}))
        if progress:
            progress.step(f"token rows, {transport}, {world} msrun workers")
        for (_, what_name, variant, hidden), entry in sorted(merged.items()):
            float32 = merged[(transport, what_name, "float32", hidden)]["min_s"]
            bfloat16 = merged[(transport, what_name, "bfloat16", hidden)]["min_s"]
            gbps = entry["payload_rows"] * hidden * entry["value_bytes"] / entry["min_s"] / 1e9
            entries.append({"transport": transport, "ranks": world, "what": what_name,
                            "rows": variant, "hidden": hidden,
                            "tokens_per_rank": entry["tokens"], "time_s": entry["min_s"],
                            "median_s": entry["median_s"], "payload_gbps": gbps,
                            "speedup_vs_float32": float32 / entry["min_s"],
                            "speedup_vs_bfloat16": bfloat16 / entry["min_s"]})
            rows.append([transport, world, what_name, hidden, variant, entry["tokens"],
                         entry["min_s"] * 1e3, gbps, float32 / entry["min_s"],
                         bfloat16 / entry["min_s"]])
    return entries, rows


ROW_FORMAT_HEADER = ["transport", "ranks", "what", "hidden", "rows", "tokens/rank", "ms",
                     "payload GB/s", "x float32", "x bfloat16"]


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    parser.add_argument("--ranks", default="2,4", help="comma-separated worker counts")
    parser.add_argument("--transports", default="shm,allgather",
                        help="comma-separated dispatch.transport values")
    parser.add_argument("--transport", default=None, help=argparse.SUPPRESS)  # worker's
    parser.add_argument("--what", default=",".join(WHAT), help=argparse.SUPPRESS)  # worker's
    args = parser.parse_args(argv)
    if args.role == "ms":
        return ms_worker(args.quick, args.transport, args.what.split(","))
    ranks = [int(r) for r in args.ranks.split(",")]
    transports = args.transports.split(",")
    print(f"[{NAME}] {bc.describe_machine(bc.machine_info())}", flush=True)
    progress = bc.Progress(NAME, len(ranks) * len(transports))
    entries, rows = measure_row_formats(ranks, transports, args.quick, progress=progress)
    print(bc.table(ROW_FORMAT_HEADER, rows))

    def worst(what, hidden, variant, versus, transport="shm"):
        values = [e[f"speedup_vs_{versus}"] for e in entries
                  if e["what"] == what and e["rows"] == variant and e["hidden"] == hidden
                  and e["transport"] == transport]
        return min(values) if values else None
    # Like for like: the same layer with and without int8 rows (float32 layer vs float32,
    # bfloat16 layer vs bfloat16).
    largest = max(e["hidden"] for e in entries)
    measured = {
        "prefill_int8_vs_float32": worst("prefill exchange", largest, "int8", "float32"),
        "prefill_int8_vs_bfloat16": worst("prefill exchange", largest, "int8 (bf16 layer)",
                                          "bfloat16"),
        "decode_int8_vs_float32": worst("decode round trip", largest, "int8", "float32")}
    if "allgather" in transports:  # the same targets over the byte-bound transport
        measured.update({f"{name}_allgather": worst(what, largest, variant, versus, "allgather")
                         for name, (what, variant, versus) in {
                             "prefill_int8_vs_float32": ("prefill exchange", "int8", "float32"),
                             "prefill_int8_vs_bfloat16": ("prefill exchange",
                                                          "int8 (bf16 layer)", "bfloat16"),
                             "decode_int8_vs_float32": ("decode round trip", "int8",
                                                        "float32")}.items()})
    def target(name):
        return TARGETS[name.replace("_allgather", "")]
    summary = {name: {"target": f">= {target(name)}x", "worst_over_ranks": value,
                      "met": bool(value is not None and value >= target(name))}
               for name, value in measured.items()}
    summary["hidden"] = largest
    for name, item in summary.items():
        if name != "hidden" and item["worst_over_ranks"] is not None:
            print(f"[{NAME}] {name} at hidden {largest}: {item['worst_over_ranks']:.2f}x "
                  f"(target {item['target']}) {'met' if item['met'] else 'NOT met'}", flush=True)
    bc.write_results(args.out, NAME, {
        "config": {"ranks": ranks, "transports": transports, "experts": EXPERTS, "top_k": TOP_K, "quick": args.quick,
                   "prefill_tokens_per_rank": PREFILL_TOKENS,
                   "decode_tokens_per_rank": DECODE_TOKENS, "mode": "GRAPH_MODE"},
        "method": __doc__.split("\n\n", 2)[2], "rows": entries, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
