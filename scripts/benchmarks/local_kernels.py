#!/usr/bin/env python
"""Local dispatch / combine kernels: effective bandwidth against memcpy, in the same run.

    python scripts/benchmarks/local_kernels.py [--quick] [--out DIR]

What is measured, for T tokens routed to top-K of E experts, hidden H, float32 and bfloat16:

- ``MoeEpDispatch`` (``mindspore_moe_ep.ops.DispatchKernel``): copies every token row to its K
  expert slots. Bytes moved = T rows read (each token once) + T*K rows written.
- ``MoeEpCombine`` (``CombineKernel``): weighted sum of each token's K expert rows. Bytes moved =
  T*K rows read + T rows written.
- memcpy: libc memcpy (what ``numpy.copyto`` calls) of the same number of bytes, half read and
  half written, on one thread and on as many threads as the kernel (the faster of the two is
  the reference), timed in alternation with the kernel in the same process (so load from other
  processes hits both alike); ``numpy.copyto`` (one thread) is recorded too as a cross-check.

Bytes count each distinct byte once (the minimum traffic of the operation): a kernel that reads
a token row K times from cache is not credited K times.

Method (two ways, both reported):

1. ``direct``: the kernels' C entry points are called through ctypes with NumPy buffers, exactly
   as MindSpore calls an AOT kernel (``int f(nparam, params, ndims, shapes, dtypes, stream,
   extra)``). This is the kernel alone. It runs in a child process per thread count, because the
   kernels read MOE_EP_NUM_THREADS once per process.
2. ``graph``: the Cells ``DispatchKernel`` / ``CombineKernel`` inside one GRAPH_MODE Cell that
   calls them N times per launch (chained with ``ops.depend`` so none is pruned), so the
   ~150 us graph launch is amortised; this includes MindSpore's per-kernel cost (output
   allocation, argument marshalling). Default kernel threads.

Effective bandwidth = bytes moved / time; the ratio to memcpy's bandwidth is the figure of merit
(target: >= 0.8 for hidden >= 1024).
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import bench_common as bc

NAME = "local_kernels"
TOKENS, TOP_K, EXPERTS = 256, 8, 64
KERNEL_ARG_TYPES = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
                    ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)),
                    ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p, ctypes.c_void_p]
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}


def make_x(tokens, hidden, dtype, seed=1):
    values = np.random.default_rng(seed).standard_normal((tokens, hidden), dtype=np.float32)
    if dtype == "float32":
        return values
    return (values.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits (truncated)


class DirectKernel:
    """Calls an AOT entry point of the kernel library with NumPy arrays (inputs, then outputs)."""

    def __init__(self, library, name, arrays, dtypes):
        self.function = getattr(library, name)
        self.function.restype = ctypes.c_int
        self.function.argtypes = KERNEL_ARG_TYPES
        self.name = name
        count = len(arrays)
        self._keep = arrays
        self.params = (ctypes.c_void_p * count)(*[a.ctypes.data for a in arrays])
        self.ndims = (ctypes.c_int * count)(*[a.ndim for a in arrays])
        self._shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
        self.shapes = (ctypes.POINTER(ctypes.c_int64) * count)(
            *[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in self._shapes])
        self.dtypes = (ctypes.c_char_p * count)(*[d.encode() for d in dtypes])
        self.count = count

    def __call__(self):
        status = self.function(self.count, self.params, self.ndims, self.shapes, self.dtypes,
                               None, None)
        if status != 0:
            raise RuntimeError(f"{self.name} returned {status}")


def bytes_moved(kernel, tokens, top_k, hidden, element_bytes):
    """Distinct bytes read + written: (K + 1) * T rows for both kernels."""
    row = hidden * element_bytes
    return tokens * top_k * row + tokens * row


def direct_worker(hiddens, dtypes, repeats, result_path):
    """Child process: direct calls at MOE_EP_NUM_THREADS threads, plus memcpy at as many."""
    from mindspore_moe_ep.ops.kernel_library import library_path
    library = ctypes.CDLL(library_path())
    threads = int(os.environ["MOE_EP_NUM_THREADS"])
    ids, weights = bc.random_routing(TOKENS, TOP_K, EXPERTS)
    rows = []
    for dtype in dtypes:
        for hidden in hiddens:
            element = ELEMENT_BYTES[dtype]
            store = np.float32 if dtype == "float32" else np.uint16
            x = make_x(TOKENS, hidden, dtype)
            grouped = np.empty((TOKENS * TOP_K, hidden), store)
            positions = np.empty((TOKENS, TOP_K), np.int32)
            counts = np.empty(EXPERTS, np.int32)
            dropped = np.empty(1, np.int32)
            capacity = np.zeros(1, np.int32)
            y = np.empty((TOKENS, hidden), store)
            dispatch = DirectKernel(library, "MoeEpDispatch",
                                    [x, ids, capacity, grouped, positions, counts, dropped],
                                    [dtype, "int32", "int32", dtype, "int32", "int32", "int32"])
            combine = DirectKernel(library, "MoeEpCombine", [grouped, positions, weights, y],
                                   [dtype, "int32", "float32", dtype])
            dispatch()
            assert counts.sum() == TOKENS * TOP_K and dropped[0] == 0
            for kernel, call in (("dispatch", dispatch), ("combine", combine)):
                moved = bytes_moved(kernel, TOKENS, TOP_K, hidden, element)
                source = np.ones(moved // 2, np.uint8)
                destination = np.zeros_like(source)
                functions = {"kernel": call, "memcpy": bc.make_memcpy(moved // 2, threads=1),
                             "numpy": lambda: np.copyto(destination, source)}
                if threads > 1:
                    functions["memcpy threads"] = bc.make_memcpy(moved // 2, threads=threads)
                times = bc.interleaved_times(functions, repeats=repeats, warmup=2)
                if threads > 1 and times["memcpy threads"]["min_s"] < times["memcpy"]["min_s"]:
                    times["memcpy"] = times["memcpy threads"]  # the faster memcpy is the reference
                timing = times["kernel"]
                rows.append({"method": "direct", "kernel": kernel, "dtype": dtype,
                             "hidden": hidden, "threads": threads, "bytes_moved": moved,
                             "kernel_s": timing["min_s"], "kernel_median_s": timing["median_s"],
                             "memcpy_s": times["memcpy"]["min_s"],
                             "kernel_gbps": moved / timing["min_s"] / 1e9,
                             "memcpy_gbps": moved / times["memcpy"]["min_s"] / 1e9,
                             "numpy_copy_1thread_gbps": moved / times["numpy"]["min_s"] / 1e9})
                rows[-1]["ratio_vs_memcpy"] = rows[-1]["kernel_gbps"] / rows[-1]["memcpy_gbps"]
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle)


def run_direct(hiddens, dtypes, repeats, threads):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    environment = dict(os.environ, MOE_EP_NUM_THREADS=str(threads), GLOG_v="3")
    environment["PYTHONPATH"] = os.pathsep.join([bc.REPOSITORY_ROOT, bc.HERE,
                                                 environment.get("PYTHONPATH", "")])
    command = [sys.executable, os.path.abspath(__file__), "--direct-worker", result_path,
               "--hiddens", ",".join(map(str, hiddens)), "--dtypes", ",".join(dtypes),
               "--repeats", str(repeats)]
    subprocess.run(command, env=environment, check=True)
    with open(result_path, encoding="utf-8") as handle:
        rows = json.load(handle)
    os.unlink(result_path)
    return rows


def run_graph(hiddens, dtypes, repeats, calls_per_launch):
    """DispatchKernel / CombineKernel called calls_per_launch times in one GRAPH_MODE Cell."""
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    from mindspore_moe_ep.ops import CombineKernel, DispatchKernel
    bc.start_mindspore("graph")
    threads = int(os.environ.get("MOE_EP_NUM_THREADS", bc.threads_per_process(1)))

    class RepeatDispatch(nn.Cell):
        def __init__(self, calls):
            super().__init__()
            self.calls = calls
            self.dispatch = DispatchKernel(EXPERTS)

        def construct(self, x, ids):
            grouped = None
            for _ in range(self.calls):
                grouped, _, _, _ = self.dispatch(x, ids)
                x = ops.depend(x, grouped)
            return grouped

    class RepeatCombine(nn.Cell):
        def __init__(self, calls):
            super().__init__()
            self.calls = calls
            self.combine = CombineKernel()

        def construct(self, grouped, positions, weights):
            y = None
            for _ in range(self.calls):
                y = self.combine(grouped, positions, weights)
                grouped = ops.depend(grouped, y)
            return y

    ids_np, weights_np = bc.random_routing(TOKENS, TOP_K, EXPERTS)
    ids, weights = Tensor(ids_np), Tensor(weights_np)
    rows = []
    for dtype in dtypes:
        ms_dtype = ms.float32 if dtype == "float32" else ms.bfloat16
        for hidden in hiddens:
            x = Tensor(make_x(TOKENS, hidden, "float32")).astype(ms_dtype)
            grouped, positions, _, _ = DispatchKernel(EXPERTS)(x, ids)
            cells = {"dispatch": (RepeatDispatch(calls_per_launch), (x, ids)),
                     "combine": (RepeatCombine(calls_per_launch), (grouped, positions, weights))}
            for kernel, (cell, inputs) in cells.items():
                moved = bytes_moved(kernel, TOKENS, TOP_K, hidden, ELEMENT_BYTES[dtype])
                memcpy_once = bc.make_memcpy(moved // 2, threads=threads)
                times = bc.interleaved_times(
                    {"kernel": lambda: cell(*inputs).asnumpy(), "memcpy": memcpy_once},
                    repeats=repeats, warmup=1, inner={"kernel": calls_per_launch})
                timing, memcpy = times["kernel"], times["memcpy"]
                row = {"method": "graph", "kernel": kernel, "dtype": dtype, "hidden": hidden,
                       "threads": threads, "bytes_moved": moved,
                       "calls_per_launch": calls_per_launch,
                       "kernel_s": timing["min_s"], "kernel_median_s": timing["median_s"],
                       "memcpy_s": memcpy["min_s"], "kernel_gbps": moved / timing["min_s"] / 1e9,
                       "memcpy_gbps": moved / memcpy["min_s"] / 1e9}
                row["ratio_vs_memcpy"] = row["kernel_gbps"] / row["memcpy_gbps"]
                rows.append(row)
    return rows


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--direct-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hiddens", default=None, help="comma-separated hidden sizes")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    if args.direct_worker:
        direct_worker([int(h) for h in args.hiddens.split(",")], args.dtypes.split(","),
                      args.repeats, args.direct_worker)
        return 0

    hiddens = ([int(h) for h in args.hiddens.split(",")] if args.hiddens else
               [256, 1024, 4096] if args.quick else [256, 512, 1024, 2048, 4096, 7168])
    dtypes = args.dtypes.split(",")
    repeats = args.repeats or (5 if args.quick else 15)
    cores = bc.threads_per_process(1)
    thread_counts = sorted({1, cores})
    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    print(f"[{NAME}] T={TOKENS} tokens, top-{TOP_K} of {EXPERTS} experts, hidden {hiddens}, "
          f"{dtypes}, kernel threads {thread_counts}", flush=True)
    progress = bc.Progress(NAME, len(thread_counts) + 1)
    rows = []
    for threads in thread_counts:
        rows += run_direct(hiddens, dtypes, repeats, threads)
        progress.step(f"direct calls, {threads} thread(s)")
    rows += run_graph(hiddens, dtypes, repeats, calls_per_launch=8 if args.quick else 16)
    progress.step("GRAPH_MODE Cells")

    print(bc.table(["method", "kernel", "dtype", "hidden", "threads", "MB moved", "kernel GB/s",
                    "memcpy GB/s", "ratio"],
                   [[r["method"], r["kernel"], r["dtype"], r["hidden"], r["threads"],
                     r["bytes_moved"] / 1e6, r["kernel_gbps"], r["memcpy_gbps"],
                     r["ratio_vs_memcpy"]] for r in rows]))
    # Target: direct calls at the full thread count, hidden >= 1024.
    target_rows = [r for r in rows if r["method"] == "direct" and r["threads"] == cores
                   and r["hidden"] >= 1024]
    worst = min(target_rows, key=lambda r: r["ratio_vs_memcpy"]) if target_rows else None
    summary = {"target": ">= 0.8x memcpy for hidden >= 1024",
               "min_ratio_hidden_ge_1024": worst["ratio_vs_memcpy"] if worst else None,
               "worst_case": worst,
               "met": bool(worst and worst["ratio_vs_memcpy"] >= 0.8)}
    print(f"[{NAME}] worst ratio vs memcpy for hidden >= 1024 (direct, {cores} threads): "
          f"{summary['min_ratio_hidden_ge_1024']:.2f} -> target "
          f"{'met' if summary['met'] else 'NOT met'}", flush=True)
    bc.write_results(args.out, NAME, {
        "config": {"tokens": TOKENS, "top_k": TOP_K, "experts": EXPERTS, "hiddens": hiddens,
                   "dtypes": dtypes, "repeats": repeats, "thread_counts": thread_counts,
                   "quick": args.quick},
        "method": __doc__.split("Method (two ways, both reported):")[1].split(
            "Effective bandwidth")[0].strip(),
        "rows": rows, "summary": summary})
    if not args.no_plot:
        def draw(plt):
            for kernel, marker in (("dispatch", "o"), ("combine", "s")):
                for dtype, style in (("float32", "-"), ("bfloat16", "--")):
                    points = [r for r in rows if r["method"] == "direct" and r["kernel"] == kernel
                              and r["dtype"] == dtype and r["threads"] == cores]
                    if points:
                        plt.plot([p["hidden"] for p in points],
                                 [p["ratio_vs_memcpy"] for p in points], style, marker=marker,
                                 label=f"{kernel} {dtype}")
            plt.axhline(0.8, color="grey", linestyle=":", label="target 0.8")
            plt.xscale("log", base=2)
            plt.xlabel("hidden size")
            plt.ylabel(f"bandwidth / memcpy bandwidth ({cores} threads)")
            plt.title(f"Local kernels vs memcpy (T={TOKENS}, top-{TOP_K}, direct calls)")
            plt.legend()
        bc.save_plot(args.out, NAME, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
