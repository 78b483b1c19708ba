#!/usr/bin/env python
"""Prefill memory: peak bytes of communication buffers + activations, sparse path vs a dense
capacity-padded all-to-all (GShard style), per rank.

    python scripts/benchmarks/prefill_memory.py [--quick] [--out DIR]

Routing: T tokens per rank, top-K of E experts drawn uniformly at random (the case most
favourable to the dense layout: balanced loads), R ranks, L = E / R experts per rank, hidden H,
expert width F, float32. The dense capacity c is the smallest that drops nothing on this
routing: the largest number of one rank's tokens choosing one expert.

Analytic model. Each design is its forward pass as a list of steps, each reading and making
named buffers of known size. A buffer lives from the step that makes it through the last step
that reads it (the input x throughout, the output y to the end); the peak is the largest sum
of live buffers at any step, what a memory pool that reuses freed blocks (MindSpore's) needs.
For training, the buffers the backward pass reads live to the end of the forward pass as well;
their sum is what every layer of a model keeps until its backward pass.

- sparse, row-wise experts (``MoELayer`` in inference, and in training with
  ``runtime.recompute_experts``; static shapes, C = ``dispatch.max_tokens_per_rank`` = T):
  routing indices and send metadata [R*C, 2K]; the delivery (``DeliverRows``) reads each row
  straight from its source's x into the received rows [R*C, H] (no send rows), with the
  received metadata; then, in inference where MoELayer uses it (its buffers are smaller than
  the partial sums), the fused experts + combine (``ExpertsCombine``): the experts' scratch
  (per thread: a chunk of at most 512 rows and 16 MiB of gathered rows, gate_up and hidden; 4
  threads counted), one round's partial sums and returned rows ([R*B, H] each, B =
  ``dispatch.combine_round_tokens``) and the output [T, H]; otherwise (and in training) the
  unfused steps: the scratch and per-rank partial sums [R*C, H], then returned rows [R*C, H]
  and the output; plus the shared-memory window (R*(R-1) slots as MoELayer sizes them).
  Training keeps the received rows and metadata and recomputes the experts in backward (their
  per-pair buffers then live during one layer's backward only);
- sparse, grouped experts (``MoELayer`` training): the same, but the received rows are grouped
  into one row per (token, expert) pair [R*C*K, H] and the experts make gate_up [R*C*K, 2F],
  hidden [R*C*K, F] and expert output [R*C*K, H] (static worst case), before the weighted
  combine into the partial sums; training keeps all four;
- dense index-based (capacity-padded all-to-all without mask tensors): dispatched [E, c, H],
  received [E, c, H], gate_up [E*c, 2F], hidden [E*c, F], expert output [E*c, H], returned
  [E, c, H], output [T, H]; training keeps received, gate_up, hidden and returned;
- dense GShard einsum (fairscale's MOELayer): the same plus the dispatch mask and combine
  weights [T, E, c] float32 (kept for training).

Measured: the peak resident-set growth (VmHWM, reset just before the step, minus the RSS before
it) of the first prefill step of ``MoELayer`` under msrun (R = 4, PYNATIVE_MODE; a small layer
ran first to take the one-time costs: kernel loading, memory pools): the inference forward
(row-wise experts, fused with the combine where the layer fuses them), the training-mode
forward alone (grouped experts), and a training forward + backward with grouped experts and
with ``runtime.recompute_experts``; and of a PyTorch dense GShard forward in one process that
frees each buffer after its last use (the all-to-all replaced by a copy of the same size: it
does not change the buffers). Frameworks differ in allocators, so the analytic figures are the
comparison; the measurements check their order of magnitude. Pages of a static buffer that no
kernel touches (rows past the counts) are not resident on a first forward, so measured growth
can be below the analytic size; a pool reusing pages across steps does not keep that saving.
Target (the seed's prefill case, inference): sparse <= 0.5x dense.
"""
import os
import sys

import numpy as np

import bench_common as bc

NAME = "prefill_memory"
WORLD, EXPERTS, TOP_K, ELEMENT = 4, 64, 8, 4
SCRATCH_THREADS = 4             # kernel threads counted for the row-wise experts' scratch
SCRATCH_BYTES_PER_THREAD = 16 << 20  # custom_ops/cpu/expert_ffn.cc: kScratchBytesPerThread
SCRATCH_MAX_ROWS, SCRATCH_MIN_ROWS = 512, 32


def routing_statistics(tokens):
    """Over all R ranks' routing: dense capacity, rows exchanged and pairs received per rank."""
    local = EXPERTS // WORLD
    capacity, sent_rows, received_pairs = 0, np.zeros(WORLD), np.zeros(WORLD)
    for rank in range(WORLD):
        ids, _ = bc.random_routing(tokens, TOP_K, EXPERTS, seed=rank)
        capacity = max(capacity, int(np.bincount(ids.ravel(), minlength=EXPERTS).max()))
        destination = ids // local
        for dest in range(WORLD):
            goes = (destination == dest)
            sent_rows[rank] += goes.any(axis=1).sum()
            received_pairs[dest] += goes.sum()
    return {"dense_capacity": capacity, "max_rows_sent_per_rank": int(sent_rows.max()),
            "max_pairs_received_per_rank": int(received_pairs.max()),
            "mean_pairs_per_expert_per_rank": tokens * TOP_K / EXPERTS}


def layer_config(tokens, hidden, ffn, recompute_experts=False):
    """The MoELayer config of the measured sparse path (float32, dropless, EP 4)."""
    import mindspore_moe_ep as mee
    return mee.MoEConfig.from_dict({
        "model": {"hidden_size": hidden, "num_experts": EXPERTS, "expert_ffn_size": ffn},
        "router": {"top_k": TOP_K},
        "parallel": {"expert_parallel": WORLD},
        "dispatch": {"max_tokens_per_rank": tokens, "decode_token_threshold": 0,
                     "transport": "shm"},
        "runtime": {"mode": "pynative", "dtype": "float32",
                    "recompute_experts": recompute_experts}})


def layer_slot_bytes(tokens, hidden):
    """The window slot MoELayer sizes for this layer (its default rule)."""
    from mindspore_moe_ep.comm.window_sizing import window_slot_bytes
    return window_slot_bytes(layer_config(tokens, hidden, ffn=1))


def layer_round_rows(tokens, hidden):
    """Rows per source in one round of MoELayer's fused experts + combine (its default rule;
    None: the layer runs the unfused steps, which then hold less)."""
    from mindspore_moe_ep.comm.window_sizing import combine_round_rows
    return combine_round_rows(layer_config(tokens, hidden, ffn=1), WORLD)


def scratch_bytes(hidden, ffn):
    """The row-wise experts kernel's scratch: threads x chunk rows x (H + 3F) elements."""
    row = (hidden + 3 * ffn) * ELEMENT
    rows = min(max(SCRATCH_BYTES_PER_THREAD // row, SCRATCH_MIN_ROWS), SCRATCH_MAX_ROWS)
    return SCRATCH_THREADS * rows * row


def footprint(steps, sizes, kept=()):
    """Peak of the live buffers over ``steps`` [(name, reads, makes)].

    A buffer lives from the step that makes it through the last step that reads it; x lives
    throughout, y and the ``kept`` buffers to the end. Returns the peak, the step where it
    occurs and the live buffers there."""
    end = len(steps)
    born, last_read = {"x": -1}, {"x": end, "y": end}
    for index, (_, reads, makes) in enumerate(steps):
        for name in makes:
            born[name] = index
            last_read.setdefault(name, index)
        for name in reads:
            last_read[name] = max(last_read.get(name, index), index)
    for name in kept:
        last_read[name] = end
    peak, peak_step, peak_live = -1, None, {}
    for index, (step, _, _) in enumerate(steps):
        live = {name: sizes[name] for name in born if born[name] <= index <= last_read[name]}
        if sum(live.values()) > peak:
            peak, peak_step, peak_live = sum(live.values()), step, live
    return peak, peak_step, peak_live


def designs(tokens, hidden, ffn, stats):
    """{design: (sizes, steps, kept for backward)} of the four designs, bytes per rank."""
    row, e = hidden * ELEMENT, ELEMENT
    slots = WORLD * tokens                               # R*C with C = T
    pairs = slots * TOP_K                                 # the grouped path's static rows
    window = WORLD * (WORLD - 1) * layer_slot_bytes(tokens, hidden)
    sparse_sizes = {"x": tokens * row, "y": tokens * row, "window": window,
                    "routing": slots * (1 + TOP_K) * 4 + tokens * WORLD * 4,
                    "send metadata": slots * 2 * TOP_K * 4,
                    "received rows": slots * row, "received metadata": slots * 2 * TOP_K * 4,
                    "partial sums": slots * row, "returned rows": slots * row}
    # DeliverRows: each receiver reads its rows straight from the sources' x (no send rows).
    delivery = [("layout", ["x"], ["routing", "window"]),
                ("pack metadata", ["routing"], ["send metadata"]),
                ("deliver rows (pulled) and metadata", ["x", "send metadata", "window"],
                 ["received rows", "received metadata"])]
    returning = [("return", ["partial sums", "window"], ["returned rows"]),
                 ("sum per token", ["returned rows", "routing", "window"], ["y"])]
    round_rows = layer_round_rows(tokens, hidden)
    round_bytes = WORLD * (round_rows or 0) * row
    rowwise_sizes = dict(sparse_sizes, **{"experts scratch": scratch_bytes(hidden, ffn),
                                          "round partial sums": round_bytes,
                                          "round returned rows": round_bytes})
    # Training (recompute_experts), and inference where rounds would not hold less: unfused.
    rowwise_training = delivery + [("experts (row-wise)", ["received rows", "received metadata"],
                                    ["experts scratch", "partial sums"])] + returning
    # Inference: the fused experts + combine, in rounds (MoELayer's rule).
    rowwise = rowwise_training if round_rows is None else delivery + [
        ("experts + combine (fused, in rounds)",
         ["received rows", "received metadata", "routing", "window"],
         ["experts scratch", "round partial sums", "round returned rows", "y"])]
    grouped_sizes = dict(sparse_sizes, **{
        "grouped rows": pairs * row, "positions": slots * TOP_K * 4,
        "gate_up": pairs * 2 * ffn * e, "hidden": pairs * ffn * e, "expert output": pairs * row})
    grouped = delivery + [
        ("group by expert", ["received rows", "received metadata"], ["grouped rows", "positions"]),
        ("gemm gate_up", ["grouped rows"], ["gate_up"]),
        ("swiglu", ["gate_up"], ["hidden"]),
        ("gemm down", ["hidden"], ["expert output"]),
        ("combine", ["expert output", "positions", "received metadata"], ["partial sums"]),
    ] + returning
    dense_rows = EXPERTS * stats["dense_capacity"]
    dense_sizes = {"x": tokens * row, "y": tokens * row, "routing": tokens * TOP_K * 4 * 2,
                   "dispatched": dense_rows * row, "received": dense_rows * row,
                   "gate_up": dense_rows * 2 * ffn * e, "hidden": dense_rows * ffn * e,
                   "expert output": dense_rows * row, "returned": dense_rows * row}
    dense_steps = [("positions", ["x"], ["routing"]),
                   ("dispatch", ["x", "routing"], ["dispatched"]),
                   ("all-to-all", ["dispatched"], ["received"]),
                   ("gemm gate_up", ["received"], ["gate_up"]),
                   ("swiglu", ["gate_up"], ["hidden"]),
                   ("gemm down", ["hidden"], ["expert output"]),
                   ("all-to-all back", ["expert output"], ["returned"]),
                   ("combine", ["returned", "routing"], ["y"])]
    dense_kept = ["routing", "received", "gate_up", "hidden", "returned"]
    mask_bytes = tokens * EXPERTS * stats["dense_capacity"] * 4
    gshard_sizes = dict(dense_sizes, **{"dispatch mask": mask_bytes,
                                        "combine weights": mask_bytes})
    gshard_steps = ([("masks", ["x"], ["routing", "dispatch mask", "combine weights"]),
                     ("dispatch", ["x", "dispatch mask"], ["dispatched"])] + dense_steps[2:-1]
                    + [("combine", ["returned", "combine weights"], ["y"])])
    return {
        "sparse, row-wise experts": (rowwise_sizes, rowwise, rowwise_training,
                                     ["routing", "received rows", "received metadata"]),
        "sparse, grouped experts": (grouped_sizes, grouped, grouped,
                                    ["routing", "received metadata", "grouped rows", "positions",
                                     "gate_up", "hidden", "expert output"]),
        "dense capacity-padded (index-based)": (dense_sizes, dense_steps, dense_steps,
                                                dense_kept),
        "dense GShard einsum (fairscale)": (gshard_sizes, gshard_steps, gshard_steps,
                                            dense_kept + ["dispatch mask", "combine weights"]),
    }


def analytic(tokens, hidden, ffn, stats):
    """Per design: inference peak (with its step and live buffers), training forward peak and
    the bytes kept for backward."""
    result = {}
    for name, (sizes, steps, training_steps, kept) in designs(tokens, hidden, ffn, stats).items():
        peak, step, live = footprint(steps, sizes)
        train_peak, _, _ = footprint(training_steps, sizes, kept)
        result[name] = {"inference_peak": peak, "inference_peak_step": step,
                        "inference_peak_buffers": live, "training_forward_peak": train_peak,
                        "kept_for_backward": sum(sizes[b] for b in kept)}
    return result


# ---- measured: MindSpore sparse path under msrun ---------------------------------------------

# The measured MindSpore runs: (name, training?, recompute_experts?).
MS_RUNS = {"rowwise": (False, False), "grouped": (True, False),
           "train_grouped": (True, False), "train_recompute": (True, True)}


def ms_worker(tokens, hidden, ffn, run):
    """First prefill step of one kind (MS_RUNS): "rowwise" is the inference forward (row-wise
    experts), "grouped" the training-mode forward alone (grouped experts), "train_*" a forward
    + backward (the gradients of x and every parameter)."""
    import mindspore as ms
    from mindspore import Tensor
    import mindspore_moe_ep as mee
    rank = bc.start_mindspore("pynative", distributed=True)
    training, recompute = MS_RUNS[run]

    def build(max_tokens):
        layer = mee.MoELayer(layer_config(max_tokens, hidden, ffn, recompute))
        layer.set_train(training)
        return layer

    def step(layer, x):
        if not run.startswith("train"):
            return layer(x, "prefill").asnumpy()
        params = layer.trainable_params()
        grads = ms.value_and_grad(lambda v: layer(v, "prefill").sum(), grad_position=0,
                                  weights=params)(x)[1]
        return grads[0].asnumpy()

    rng = np.random.default_rng(rank)
    # Static buffers are sized by max_tokens_per_rank, not by the tokens of a call, and
    # MindSpore's pool keeps them: a small layer first takes the one-time costs (kernel loading,
    # pools), then the measured layer's first step shows its own buffers.
    step(build(8), Tensor(rng.standard_normal((8, hidden), dtype=np.float32)))
    layer = build(tokens)
    inference_path = "rowwise" if layer_round_rows(tokens, hidden) is None else "experts_combine"
    assert layer.experts_path(tokens, "prefill") == {
        "rowwise": inference_path, "grouped": "grouped", "train_grouped": "grouped",
        "train_recompute": "rowwise"}[run]
    x = Tensor(rng.standard_normal((tokens, hidden), dtype=np.float32))
    peak_reset = bc.reset_peak_rss()  # building the layer peaked above the step's own peak
    before = bc.current_rss_bytes()
    peak_before = bc.peak_rss_bytes()
    step(layer, x)
    peak = bc.peak_rss_bytes()
    window = layer.prefill_dispatcher.exchange.window
    bc.write_worker_result({"rank": rank, "rss_before": before, "peak_before": peak_before,
                            "peak_after": peak, "peak_growth": peak - max(before, 0),
                            "peak_reset": peak_reset,
                            "window_segment_bytes":
                                window.segment_bytes(window.world_size, window.slot_bytes)})


# ---- measured: PyTorch dense GShard forward of one rank ----------------------------------------

def torch_dense_peak(tokens, hidden, ffn, capacity):
    """Runs in a child process: ru_maxrss growth of one rank's dense GShard forward, each
    buffer freed after its last use (as an inference implementation would)."""
    import torch
    torch.set_num_threads(bc.threads_per_process(1))
    ids_np, weights_np = bc.random_routing(tokens, TOP_K, EXPERTS, seed=0)
    x = torch.randn(tokens, hidden)
    ids, weights = torch.from_numpy(ids_np).long(), torch.from_numpy(weights_np)
    gate_up = torch.randn(EXPERTS, hidden, 2 * ffn) * hidden ** -0.5  # all E: [R, L] blocks
    down = torch.randn(EXPERTS, ffn, hidden) * ffn ** -0.5
    # Positions within each expert (token order): the GShard cumsum.
    one_hot = torch.nn.functional.one_hot(ids, EXPERTS).sum(1)               # [T, E]
    position = (torch.cumsum(one_hot, 0) - 1) * one_hot                       # [T, E]
    bc.reset_peak_rss()
    before = bc.current_rss_bytes()
    with torch.no_grad():
        dispatch_mask = torch.zeros(tokens, EXPERTS, capacity)                 # [T, E, c]
        combine_weights = torch.zeros(tokens, EXPERTS, capacity)
        token_index = torch.arange(tokens).unsqueeze(1).expand(-1, TOP_K)
        slot = position.gather(1, ids)
        dispatch_mask[token_index, ids, slot] = 1.0
        combine_weights[token_index, ids, slot] = weights
        dispatched = torch.einsum("tec,th->ech", dispatch_mask, x)            # [E, c, H]
        del dispatch_mask
        received = dispatched.clone()                                          # all-to-all
        del dispatched
        gate_up_out = torch.bmm(received, gate_up)                             # [E, c, 2F]
        del received
        hidden_act = torch.nn.functional.silu(gate_up_out[..., :ffn]) * gate_up_out[..., ffn:]
        del gate_up_out
        expert_out = torch.bmm(hidden_act, down)                               # [E, c, H]
        del hidden_act
        returned = expert_out.clone()                                          # all-to-all back
        del expert_out
        y = torch.einsum("tec,ech->th", combine_weights, returned)
        float(y.sum())
    return bc.peak_rss_bytes() - before


# ---- parent ----------------------------------------------------------------------------------

ROWWISE, GROUPED = "sparse, row-wise experts", "sparse, grouped experts"
DENSE, GSHARD = "dense capacity-padded (index-based)", "dense GShard einsum (fairscale)"


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--ffn", type=int, default=None)
    parser.add_argument("--capacity", type=int, default=None)
    parser.add_argument("--run", choices=sorted(MS_RUNS), default="rowwise")
    args = parser.parse_args(argv)
    if args.role == "ms":
        return ms_worker(args.tokens, args.hidden, args.ffn, args.run)
    if args.role == "torch":
        bc.write_worker_result({"peak_growth": torch_dense_peak(args.tokens, args.hidden,
                                                                args.ffn, args.capacity)})
        return 0

    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    shapes = [(1024, 2048, 512), (4096, 2048, 512), (4096, 7168, 2048)]
    measured_shapes = [(512, 1024, 256)] if args.quick else [(512, 1024, 256), (2048, 2048, 512)]
    progress = bc.Progress(NAME, len(measured_shapes) * (len(MS_RUNS) + 1))
    analytic_rows, table_rows = [], []
    mib = 2 ** 20
    for tokens, hidden, ffn in sorted(set(shapes + measured_shapes)):
        stats = routing_statistics(tokens)
        parts = analytic(tokens, hidden, ffn, stats)
        dense, gshard = parts[DENSE], parts[GSHARD]
        entry = {"tokens_per_rank": tokens, "hidden": hidden, "ffn": ffn, "routing": stats,
                 "designs": parts,
                 "ratio_inference_vs_dense":
                     parts[ROWWISE]["inference_peak"] / dense["inference_peak"],
                 "ratio_inference_vs_gshard":
                     parts[ROWWISE]["inference_peak"] / gshard["inference_peak"],
                 "ratio_grouped_inference_vs_dense":
                     parts[GROUPED]["inference_peak"] / dense["inference_peak"],
                 "ratio_kept_recompute_vs_dense":
                     parts[ROWWISE]["kept_for_backward"] / dense["kept_for_backward"],
                 "ratio_kept_grouped_vs_dense":
                     parts[GROUPED]["kept_for_backward"] / dense["kept_for_backward"]}
        analytic_rows.append(entry)
        table_rows.append([tokens, hidden, ffn, stats["dense_capacity"]]
                          + [parts[d]["inference_peak"] / mib for d in (ROWWISE, GROUPED, DENSE,
                                                                        GSHARD)]
                          + [entry["ratio_inference_vs_dense"], entry["ratio_inference_vs_gshard"],
                             entry["ratio_grouped_inference_vs_dense"],
                             entry["ratio_kept_recompute_vs_dense"],
                             entry["ratio_kept_grouped_vs_dense"]])
    print(bc.table(["T/rank", "H", "F", "dense c", "row-wise MiB", "grouped MiB", "dense MiB",
                    "GShard MiB", "row-wise/dense", "row-wise/GShard", "grouped/dense",
                    "kept: recompute/dense", "kept: grouped/dense"], table_rows))

    script = os.path.abspath(__file__)
    measured = []
    for tokens, hidden, ffn in measured_shapes:
        shape_args = ["--tokens", tokens, "--hidden", hidden, "--ffn", ffn]
        threads = bc.threads_per_process(WORLD)
        entry = {"tokens_per_rank": tokens, "hidden": hidden, "ffn": ffn}
        for run in MS_RUNS:
            reports = bc.launch_msrun(script, WORLD, ["--role", "ms", *shape_args, "--run", run],
                                      env={"MOE_EP_NUM_THREADS": str(threads)})
            progress.step(f"MindSpore sparse prefill ({run}) T={tokens} H={hidden}")
            entry[f"sparse_{run}_peak_growth_bytes"] = max(r["peak_growth"] for r in reports)
            entry["window_segment_bytes"] = reports[0]["window_segment_bytes"]
        stats = routing_statistics(tokens)
        try:
            import torch  # noqa: F401
            dense = bc.launch_processes(script, 1, ["--role", "torch", *shape_args,
                                                    "--capacity", stats["dense_capacity"]])
            entry["dense_gshard_peak_growth_bytes"] = dense[0]["peak_growth"]
        except ImportError:
            entry["dense_gshard_peak_growth_bytes"] = None
        progress.step(f"PyTorch dense GShard T={tokens} H={hidden}")
        match = next(a for a in analytic_rows if (a["tokens_per_rank"], a["hidden"], a["ffn"])
                     == (tokens, hidden, ffn))
        for design, key in ((ROWWISE, "rowwise"), (GROUPED, "grouped"), (GSHARD, "gshard")):
            entry[f"analytic_{key}_bytes"] = match["designs"][design]["inference_peak"]
        if entry["dense_gshard_peak_growth_bytes"]:
            entry["measured_ratio"] = (entry["sparse_rowwise_peak_growth_bytes"]
                                       / entry["dense_gshard_peak_growth_bytes"])
        measured.append(entry)
    print(bc.table(["T/rank", "H", "F", "row-wise peak RSS growth MiB", "(analytic MiB)",
                    "grouped peak RSS growth MiB", "(analytic MiB)", "window MiB",
                    "dense GShard peak RSS growth MiB", "(analytic MiB)", "measured ratio"],
                   [[m["tokens_per_rank"], m["hidden"], m["ffn"],
                     m["sparse_rowwise_peak_growth_bytes"] / mib,
                     m["analytic_rowwise_bytes"] / mib,
                     m["sparse_grouped_peak_growth_bytes"] / mib,
                     m["analytic_grouped_bytes"] / mib, m["window_segment_bytes"] / mib,
                     (m["dense_gshard_peak_growth_bytes"] or float("nan")) / mib,
                     m["analytic_gshard_bytes"] / mib, m.get("measured_ratio")]
                    for m in measured]))
    print(bc.table(["T/rank", "H", "F", "training step, grouped: peak RSS growth MiB",
                    "training step, recompute_experts MiB", "recompute/grouped"],
                   [[m["tokens_per_rank"], m["hidden"], m["ffn"],
                     m["sparse_train_grouped_peak_growth_bytes"] / mib,
                     m["sparse_train_recompute_peak_growth_bytes"] / mib,
                     m["sparse_train_recompute_peak_growth_bytes"]
                     / m["sparse_train_grouped_peak_growth_bytes"]] for m in measured]))
    headline = max(analytic_rows, key=lambda a: a["tokens_per_rank"] * a["hidden"])
    summary = {"target": "sparse <= 0.5x dense (inference peak)",
               "shape": {k: headline[k] for k in ("tokens_per_rank", "hidden", "ffn")},
               **{k: headline[k] for k in headline if k.startswith("ratio_")},
               "worst_ratio_inference_vs_dense": max(a["ratio_inference_vs_dense"]
                                                     for a in analytic_rows),
               "met": bool(headline["ratio_inference_vs_dense"] <= 0.5)}
    print(f"[{NAME}] T={headline['tokens_per_rank']} H={headline['hidden']}: inference peak, "
          f"row-wise experts = {summary['ratio_inference_vs_dense']:.2f}x dense index-based, "
          f"{summary['ratio_inference_vs_gshard']:.2f}x GShard einsum (grouped experts: "
          f"{summary['ratio_grouped_inference_vs_dense']:.2f}x); kept for backward: "
          f"{summary['ratio_kept_recompute_vs_dense']:.2f}x with recompute_experts, "
          f"{summary['ratio_kept_grouped_vs_dense']:.2f}x grouped (target <= 0.5)", flush=True)
    bc.write_results(args.out, NAME, {
        "config": {"ranks": WORLD, "experts": EXPERTS, "top_k": TOP_K, "dtype": "float32",
                   "analytic_shapes": shapes, "measured_shapes": measured_shapes,
                   "scratch_threads": SCRATCH_THREADS, "quick": args.quick},
        "method": __doc__.split("\n\n", 2)[2], "analytic": analytic_rows, "measured": measured,
        "summary": summary})
    if not args.no_plot:
        def draw(plt):
            names = list(headline["designs"])
            buffers = sorted({b for n in names
                              for b in headline["designs"][n]["inference_peak_buffers"]})
            bottoms = np.zeros(len(names))
            for buffer in buffers:
                values = np.array([headline["designs"][n]["inference_peak_buffers"].get(
                    buffer, 0) / 2 ** 30 for n in names])
                plt.bar(range(len(names)), values, bottom=bottoms, label=buffer)
                bottoms += values
            plt.xticks(range(len(names)), [n.replace(", ", ",\n").replace(" (", "\n(")
                                           for n in names], fontsize=7)
            plt.ylabel("GiB per rank (live buffers at the inference peak)")
            plt.title(f"Prefill inference peak per rank, T={headline['tokens_per_rank']}, "
                      f"H={headline['hidden']}, F={headline['ffn']}, EP {WORLD}, top-{TOP_K}")
            plt.legend(fontsize=6)
        bc.save_plot(args.out, NAME, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
