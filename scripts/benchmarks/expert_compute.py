#!/usr/bin/env python
"""Expert compute: grouped SwiGLU experts (GroupedMatmul) in bfloat16 and float32 vs MindSpore's
float32 BatchMatMul doing the same work, with achieved FLOP/s against a measured peak.

    python scripts/benchmarks/expert_compute.py [--quick] [--out DIR]

Work: L local experts, n rows each (balanced), SwiGLU ``down(silu(x W_gate) * (x W_up))`` with
hidden H and expert width F: 6 * L * n * H * F FLOPs per call.

- ``GroupedSwiGLUExperts`` (``mindspore_moe_ep.experts``: two ``GroupedMatmul`` Custom ops on
  oneDNN + MindSpore elementwise SwiGLU) in float32 and bfloat16;
- the same with MindSpore ``ops.BatchMatMul`` in float32 on [L, n, H] tensors (bfloat16 is
  unsupported by CPU BatchMatMul);
- peak: the best of one large float32 GEMM through numpy, MindSpore ``MatMul`` (GRAPH_MODE),
  oneDNN's ``dnnl_sgemm`` called directly (the GEMM our kernels use; single-threaded per call,
  so one call per thread on a share of the rows, as our kernels run it) and PyTorch's matmul (if
  installed), same thread count.
- bfloat16 evidence: the CPU's bf16 flags, oneDNN's ``dnnl_gemm_bf16bf16f32`` called directly,
  and PyTorch's bfloat16 matmul (if installed), each against float32 at the same size.

All MindSpore work runs in GRAPH_MODE with several calls per launch (chained with
``ops.depend``). Target: bfloat16 grouped experts >= 3x the float32 BatchMatMul tokens/s.
"""
import ctypes
import os
import sys
import threading

import numpy as np

import bench_common as bc

NAME = "expert_compute"


def settings(quick):
    """(local experts, rows per expert, hidden, ffn, repeats, calls per launch)."""
    return (16, 64, 1024, 512, 3, 2) if quick else (16, 128, 2048, 1024, 5, 3)


def onednn():
    import mindspore
    path = os.path.join(os.path.dirname(mindspore.__file__), "lib", "libdnnl.so.3")
    library = ctypes.CDLL(path)
    common = [ctypes.c_char, ctypes.c_char, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
              ctypes.c_float]
    library.dnnl_sgemm.argtypes = common + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                                            ctypes.c_int64]
    library.dnnl_gemm_bf16bf16f32.argtypes = library.dnnl_sgemm.argtypes
    library.dnnl_sgemm.restype = library.dnnl_gemm_bf16bf16f32.restype = ctypes.c_int
    return library


def gemm_direct(library, size, bf16, repeats, threads=1):
    """Seconds of one size^3 GEMM through oneDNN's C API (float32 or bf16 inputs).

    MindSpore's oneDNN uses the threadpool runtime and we give it no pool, so each call runs on
    the calling thread; with ``threads`` > 1 the rows are split into that many calls on as many
    threads (ctypes releases the GIL), as the grouped-matmul kernel splits its blocks."""
    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((size, size), dtype=np.float32)
    b32 = rng.standard_normal((size, size), dtype=np.float32)
    c = np.zeros((size, size), np.float32)
    if bf16:
        a, b = (a32.view(np.uint32) >> 16).astype(np.uint16), (b32.view(np.uint32) >> 16).astype(
            np.uint16)
        function = library.dnnl_gemm_bf16bf16f32
    else:
        a, b, function = a32, b32, library.dnnl_sgemm

    bounds = [size * share // threads for share in range(threads + 1)]

    def share(index):
        first, rows = bounds[index], bounds[index + 1] - bounds[index]
        status = function(b"N", b"N", rows, size, size, 1.0, a.ctypes.data + first * a.strides[0],
                          size, b.ctypes.data, size, 0.0, c.ctypes.data + first * c.strides[0],
                          size)
        assert status == 0, status

    def call():
        helpers = [threading.Thread(target=share, args=(index,)) for index in range(1, threads)]
        for helper in helpers:
            helper.start()
        share(0)
        for helper in helpers:
            helper.join()
    return bc.time_calls(call, repeats=repeats, warmup=1)["min_s"]


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    from mindspore_moe_ep.experts import GroupedSwiGLUExperts
    from mindspore_moe_ep.ops import gemm_backend
    bc.start_mindspore("graph")

    experts, per_expert, hidden, ffn, repeats, calls = settings(args.quick)
    rows = experts * per_expert
    flops = 6.0 * rows * hidden * ffn
    info = bc.machine_info()
    threads = int(os.environ.get("MOE_EP_NUM_THREADS", bc.threads_per_process(1)))
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    print(f"[{NAME}] {experts} experts x {per_expert} rows, H={hidden}, F={ffn}: "
          f"{flops / 1e9:.2f} GFLOP per call; GEMM backend {gemm_backend()}", flush=True)
    progress = bc.Progress(NAME, 5)

    class RepeatGrouped(nn.Cell):
        def __init__(self, dtype):
            super().__init__()
            self.experts = GroupedSwiGLUExperts(list(range(experts)), hidden, ffn, dtype)

        def construct(self, x, counts):
            out = x
            for _ in range(calls):
                out = self.experts(x, counts)
                x = ops.depend(x, out)
            return out

    class RepeatBatchMatMul(nn.Cell):
        def __init__(self, grouped):
            super().__init__()
            self.gate_up = grouped.experts.gate_up_weight  # the same float32 weights
            self.down = grouped.experts.down_weight
            self.bmm = ops.BatchMatMul()

        def construct(self, x):
            out = x
            for _ in range(calls):
                gate_up = self.bmm(x, self.gate_up)                               # [L, n, 2F]
                act = ops.silu(gate_up[:, :, :ffn]) * gate_up[:, :, ffn:]          # [L, n, F]
                out = self.bmm(act, self.down)                                     # [L, n, H]
                x = ops.depend(x, out)
            return out

    x_np = np.random.default_rng(0).standard_normal((rows, hidden), dtype=np.float32)
    counts = Tensor(np.full(experts, per_expert, np.int32))
    results = {}
    grouped32 = RepeatGrouped(ms.float32)
    cells = {"grouped float32": (grouped32, (Tensor(x_np), counts)),
             "grouped bfloat16": (RepeatGrouped(ms.bfloat16),
                                  (Tensor(x_np).astype(ms.bfloat16), counts)),
             "BatchMatMul float32": (RepeatBatchMatMul(grouped32),
                                     (Tensor(x_np.reshape(experts, per_expert, hidden)),))}
    reference = None
    for name, (cell, inputs) in cells.items():
        output = cell(*inputs).astype(ms.float32).asnumpy().reshape(rows, hidden)
        if name == "grouped float32":
            reference = output
        elif name == "BatchMatMul float32":
            assert np.allclose(output, reference, rtol=1e-3, atol=1e-3), "different results"
        timing = bc.time_calls(lambda: cell(*inputs).asnumpy(), repeats=repeats, warmup=1,
                               inner=calls)
        results[name] = {"seconds": timing["min_s"], "median_s": timing["median_s"],
                         "rows_per_s": rows / timing["min_s"],
                         "gflops": flops / timing["min_s"] / 1e9}
        progress.step(name)

    # Peak float32 GEMM: numpy, MindSpore MatMul, oneDNN sgemm, one size^3 GEMM.
    size = 1024 if args.quick else 2048
    gemm_flops = 2.0 * size ** 3
    a = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    peaks = {"numpy matmul": bc.time_calls(lambda: a @ a, repeats=repeats)["min_s"]}
    matmul = ops.MatMul()

    class Mm(nn.Cell):
        def construct(self, p, q):
            return matmul(p, q)
    mm, ta = Mm(), Tensor(a)
    peaks["MindSpore MatMul"] = bc.time_calls(lambda: mm(ta, ta).asnumpy(), repeats=repeats,
                                              warmup=1)["min_s"]
    library = onednn()
    peaks["oneDNN dnnl_sgemm"] = gemm_direct(library, size, False, repeats, threads)
    try:
        import torch
        torch.set_num_threads(threads)
        ta_torch = torch.from_numpy(a)
        peaks["torch matmul"] = bc.time_calls(lambda: ta_torch @ ta_torch, repeats=repeats,
                                              warmup=1)["min_s"]
    except ImportError:
        pass
    peak_gflops = {k: gemm_flops / v / 1e9 for k, v in peaks.items()}
    peak = max(peak_gflops.values())
    progress.step("float32 peak")

    # bfloat16 evidence at a smaller size (a reference bf16 GEMM can be very slow).
    bf16_size = 256
    bf16_flops = 2.0 * bf16_size ** 3
    bf16 = {"oneDNN float32 GFLOP/s": bf16_flops / gemm_direct(library, bf16_size, False,
                                                              repeats, threads) / 1e9,
            "oneDNN bf16 GFLOP/s": bf16_flops / gemm_direct(library, bf16_size, True,
                                                           repeats, threads) / 1e9}
    try:
        import torch
        torch.set_num_threads(threads)
        t32 = torch.randn(bf16_size, bf16_size)
        t16 = t32.bfloat16()
        bf16["torch float32 GFLOP/s"] = bf16_flops / bc.time_calls(
            lambda: t32 @ t32, repeats=repeats, warmup=1)["min_s"] / 1e9
        bf16["torch bf16 GFLOP/s"] = bf16_flops / bc.time_calls(
            lambda: t16 @ t16, repeats=repeats, warmup=1)["min_s"] / 1e9
        bf16["torch cpu capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    progress.step("bfloat16 evidence")

    baseline = results["BatchMatMul float32"]["rows_per_s"]
    rows_out = []
    for name, result in results.items():
        result["ratio_vs_batchmatmul_f32"] = result["rows_per_s"] / baseline
        result["fraction_of_peak"] = result["gflops"] / peak
        rows_out.append([name, result["seconds"] * 1e3, result["rows_per_s"], result["gflops"],
                         result["fraction_of_peak"], result["ratio_vs_batchmatmul_f32"]])
    print(bc.table(["implementation", "ms/call", "rows/s", "GFLOP/s", "of peak",
                    "x BatchMatMul f32"], rows_out))
    print(bc.table(["peak GEMM " + f"{size}^3", "GFLOP/s"], list(peak_gflops.items())))
    print(bc.table(["bf16 evidence " + f"{bf16_size}^3", "value"], list(bf16.items())))
    flags = info["cpu_flags"]
    ratio = results["grouped bfloat16"]["ratio_vs_batchmatmul_f32"]
    summary = {"target": "bf16 grouped >= 3x float32 BatchMatMul", "ratio_bf16": ratio,
               "ratio_f32": results["grouped float32"]["ratio_vs_batchmatmul_f32"],
               "met": bool(ratio >= 3),
               "cpu_has_bf16_matmul_hardware": bool(flags.get("avx512_bf16")
                                                    or flags.get("amx_bf16")),
               "peak_gflops": peak}
    print(f"[{NAME}] bf16 grouped = {ratio:.2f}x float32 BatchMatMul (target 3x); "
          f"AVX512-BF16: {flags.get('avx512_bf16')}, AMX-BF16: {flags.get('amx_bf16')}",
          flush=True)
    bc.write_results(args.out, NAME, {
        "config": {"experts": experts, "rows_per_expert": per_expert, "hidden": hidden,
                   "ffn": ffn, "flops_per_call": flops, "repeats": repeats,
                   "calls_per_launch": calls, "threads": threads, "peak_gemm_size": size,
                   "gemm_backend": gemm_backend(), "quick": args.quick},
        "method": __doc__.split("\n\n", 2)[2], "results": results, "peak_gflops": peak_gflops,
        "bf16_evidence": bf16, "summary": summary})
    if not args.no_plot:
        def draw(plt):
            names = list(results) + [f"peak: {k}" for k in peak_gflops]
            values = [r["gflops"] for r in results.values()] + list(peak_gflops.values())
            plt.barh(range(len(names)), values, color=["tab:blue"] * len(results)
                     + ["tab:grey"] * len(peak_gflops))
            plt.yticks(range(len(names)), names, fontsize=8)
            plt.xlabel("GFLOP/s")
            plt.title(f"Expert FFN, {experts} experts x {per_expert} rows, H={hidden}, F={ffn}")
        bc.save_plot(args.out, NAME, draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
