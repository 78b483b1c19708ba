#!/usr/bin/env python3
"""Measure this CPU host for the planner, through the library's own kernels and exchange, and
write its cluster file (~1.5 minutes on an idle 2-core host).

    python scripts/calibrate_host.py [--out yaml_configs/clusters/cpu_host.yaml] [--ranks 4]
                                     [--max-other-load 0.1] [--tries 4] [--json FILE]

The host's ranks share its c cores the way msrun workers do, so every figure is taken with R
worker processes running at once, R = c (one rank per core) and R = ``--ranks`` (the file's
``cards_per_node``; 4 workers on 2 cores get half a core each), each worker with the library's
default kernel threads (c // R, at least 1). The file says ``compute_sharing: per_node``: its
rates are the node's, and the planner divides them among the ranks that share it.

- experts (``tflops_float32``, ``weight_pack_gbps``, ``memory_gbps``,
  ``oversubscribed_compute_efficiency``): the row-wise experts kernel that the layer's
  inference runs (``ExpertsWeightedSum``: gather, oneDNN sgemm, SwiGLU, sgemm, weighted add),
  float32, 32 experts of H = 2048, F = 256 per worker (200 MB of weights, beyond this host's
  caches as a deployment's expert weights are), with 1, 8 and 512 rows per expert: the expert
  calls all R workers complete per second together (the best interval of a ~4 s run in which
  all of them compute), as one core's time per call. oneDNN packs an expert's whole weight
  matrix in every call of two rows or more, then computes; so t(m) = pack + m * row for m >= 2
  (solved from 8 and 512 rows: the node's FLOP/s = c * 6HF / row, weight_pack_gbps =
  c * weight bytes / pack) and t(1) = one read of the weights + row (memory_gbps). R = c; the
  512-row call again with R = --ranks gives the oversubscribed efficiency (context switches).
- exchange (``intra_node_gbps``, ``operator_overhead_us``): the library's ``comm.ExchangeRows``
  over the shared-memory window under msrun, R = c: 8 MiB per rank in full blocks, one block
  a slot as MoELayer sizes the window (the node's copy bandwidth = R x each rank's bytes per
  second), and one row to every rank 1 and 20 times in one graph launch (each the median of
  six bests of 5, as below; the difference over 19: the fixed cost of one exchange operator, its synchronisation included, so
  ``intra_node_latency_us`` is 0).
- step overhead (``step_overhead_us``, ``oversubscribed_step_overhead_us``,
  ``token_overhead_ns``): a thin ``MoELayer`` (H = 1024, 8 experts of width 16, top-2, the
  library's defaults otherwise: its experts hardly compute) under msrun, timed as the
  benchmarks time layer steps (the slowest rank's best of 5 calls, each after a barrier; the
  median of six such bests). Its
  decode step at 1 token per rank, less its two exchange operators, is the step's fixed cost
  (graph launch, router and the framework's other operators, the ranks' skew), at R = c and at
  R = --ranks (where a rank that waits for a peer then waits for a core too); its prefill step
  at 512 tokens per rank less that, less what the model already counts for those tokens (its
  experts and copies, from the figures above), per token and hidden element, is
  ``token_overhead_ns`` (R = c).
- exchange operators at R = --ranks (``oversubscribed_operator_overhead_us``): as above.
- memcpy (informative): one thread per worker, R = c workers at once, 64 MiB each.
- inter-node: the loopback TCP the simulated second host uses (a ``socket.socketpair`` stream
  of 8 MiB; one-byte round trips for the latency), so the planner can cost the cross-host path.

Other jobs disturb all of this: each measurement is repeated (up to ``--tries``) until the
other processes on the machine used at most ``--max-other-load`` cores while it ran (from
/proc/stat less this command's own CPU time), and the file records the load seen. The layer
times these figures are checked against: ``scripts/plan_validation.py --layer-times``
(docs/scaling.md).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts", "benchmarks"))

import bench_common as bc  # noqa: E402
from mindspore_moe_ep.planning import ClusterSpec, save_cluster  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "yaml_configs", "clusters", "cpu_host.yaml")
# The experts measurements: H, F and local experts of each worker (200 MB of float32 weights:
# beyond this host's caches, as a deployment's expert weights are), and the rows per expert of
# the three calls the per-call model is solved from (module docstring).
EXPERTS_SHAPE = (2048, 256, 32)
ROWS_PER_EXPERT = (1, 8, 512)
# A layer whose experts hardly compute (width 16): its step is the framework's and the
# exchange's work. The library's defaults otherwise (max_tokens_per_rank 4096).
THIN_LAYER = {"model": {"hidden_size": 1024, "num_experts": 8, "expert_ffn_size": 16},
              "router": {"top_k": 2}, "runtime": {"mode": "graph", "dtype": "float32"}}
THIN_PREFILL_TOKENS = 512
# Fixed costs are timed as the expected best of this many calls (as layer_times.py times a
# layer step), from 30 calls.
STEP_REPEATS = 5
EXCHANGE_BYTES = 8 << 20
EXCHANGE_HIDDEN = 1024
FIXED_CALLS = 20


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---- experts kernel in R processes at once -----------------------------------------------------

def experts_worker(shape, duration_s, go_file, out_file):
    """One worker: the experts kernel on its own weights, calls timed until ``duration_s``
    after ``go_file`` appears; writes the (start, end) of every call."""
    import mindspore as ms
    from mindspore import Tensor, nn
    bc.start_mindspore("graph")
    from mindspore_moe_ep.experts import GroupedSwiGLUExperts
    hidden, ffn, experts, per_expert = shape
    layer_experts = GroupedSwiGLUExperts(list(range(experts)), hidden, ffn, ms.float32)
    rows = experts * per_expert
    x = Tensor(np.random.default_rng(os.getpid()).standard_normal((rows, hidden),
                                                                  dtype=np.float32))
    ids = Tensor(np.repeat(np.arange(experts, dtype=np.int32), per_expert).reshape(rows, 1))
    weights = Tensor(np.ones((rows, 1), np.float32))
    counts = Tensor(np.array([rows], np.int32))

    class Call(nn.Cell):
        def __init__(self):
            super().__init__()
            self.experts = layer_experts

        def construct(self, x, ids, weights, counts):
            return self.experts.weighted_sum(x, ids, weights, counts)[0]

    call = Call()
    for _ in range(2):
        call(x, ids, weights, counts).asnumpy()
    open(f"{go_file}.ready.{os.getpid()}", "w").close()
    while not os.path.exists(go_file):
        time.sleep(0.001)
    stamps, end = [], time.perf_counter() + duration_s
    while time.perf_counter() < end:
        start = time.perf_counter()
        call(x, ids, weights, counts).asnumpy()
        stamps.append((start, time.perf_counter()))
    with open(out_file, "w", encoding="utf-8") as stream:
        json.dump({"stamps": stamps}, stream)


def experts_rate(shape, processes, cores, duration_s=4.0):
    """(FLOP/s, weight bytes/s) of ``processes`` workers computing at once: the best interval
    (0.5 s, or three calls if longer) of the time all of them ran, each call's work spread
    evenly over it."""
    hidden, ffn, experts, per_expert = shape
    flops_per_call = 6.0 * hidden * ffn * experts * per_expert
    bytes_per_call = 3.0 * hidden * ffn * 4 * experts
    work = tempfile.mkdtemp(prefix="calibrate_", dir=os.environ.get("TMPDIR"))
    go = os.path.join(work, "go")
    environment = dict(os.environ, MOE_EP_NUM_THREADS=str(max(1, cores // processes)),
                       GLOG_v="3")
    workers = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--role", "experts",
         "--shape", ",".join(map(str, shape)), "--duration", str(duration_s), "--go", go,
         "--result", os.path.join(work, f"{index}.json")], env=environment)
        for index in range(processes)]
    while len([name for name in os.listdir(work) if ".ready." in name]) < processes:
        if any(worker.poll() not in (None, 0) for worker in workers):
            raise RuntimeError("an experts worker failed")
        time.sleep(0.05)
    open(go, "w").close()
    for worker in workers:
        if worker.wait() != 0:
            raise RuntimeError("an experts worker failed")
    stamps = []
    for index in range(processes):
        with open(os.path.join(work, f"{index}.json"), encoding="utf-8") as stream:
            stamps.append(json.load(stream)["stamps"])
        os.remove(os.path.join(work, f"{index}.json"))
    for name in os.listdir(work):
        os.remove(os.path.join(work, name))
    os.rmdir(work)
    bin_s = max(0.5, 3 * float(np.median([e - s for calls in stamps for s, e in calls])))
    first = max(calls[0][0] for calls in stamps)
    last = min(calls[-1][1] for calls in stamps)
    best = 0.0
    begin = first
    while begin + bin_s <= last + 1e-9:
        end = begin + bin_s
        done = sum(max(0.0, min(e, end) - max(s, begin)) / (e - s)
                   for calls in stamps for s, e in calls)
        best = max(best, done / bin_s)
        begin += bin_s / 2
    if best == 0.0:  # calls longer than the interval: the whole common window
        best = sum(max(0.0, min(e, last) - max(s, first)) / (e - s)
                   for calls in stamps for s, e in calls) / max(last - first, 1e-9)
    return best * flops_per_call, best * bytes_per_call


# ---- the exchange and a thin layer under msrun -------------------------------------------------

def msrun_worker():
    """Exchange bandwidth and fixed cost, and a thin layer's steps, at R = world ranks."""
    from mindspore import Tensor
    import mindspore_moe_ep as mee
    from mindspore.communication import get_group_size
    from mindspore_moe_ep.comm import make_exchange
    rank = bc.start_mindspore("graph", distributed=True)
    world = get_group_size()

    barrier = bc.world_barrier

    def best_after_barrier(function, repeats, group=None):
        """The best of ``repeats`` calls, each after a barrier; with ``group``, the median of
        the best of each ``group`` calls: the expected best of ``group`` (the benchmarks time
        a layer step as the best of 3 to 5 calls; for a widely spread fixed cost the best of
        30 would be lower than that)."""
        function()
        function()
        samples = []
        for _ in range(repeats):
            barrier()
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
        if group:
            return float(np.median([min(samples[i:i + group])
                                    for i in range(0, len(samples) - group + 1, group)]))
        return min(samples)

    result = {}
    # Bandwidth: full blocks of 8 MiB per rank (as MoELayer sizes the window: a block a slot).
    capacity = EXCHANGE_BYTES // (EXCHANGE_HIDDEN * 4) // world
    exchange = make_exchange(capacity, transport="shm",
                             slot_bytes=capacity * EXCHANGE_HIDDEN * 4).keep_tail()
    rows = Tensor(np.ones((world * capacity, EXCHANGE_HIDDEN), np.float32))
    full = Tensor(np.full(world, capacity, np.int32))
    bulk = bc.repeat_exchange(exchange, 4)
    result["bulk_s"] = best_after_barrier(lambda: bulk(rows, full).asnumpy(), 8) / 4
    exchange.window.close()
    # Fixed cost: one row to every rank, 1 and FIXED_CALLS exchanges in one graph launch (the
    # rows' tails are not touched: keep_tail, as the layer's row exchanges).
    exchange = make_exchange(4, transport="shm").keep_tail()
    rows = Tensor(np.ones((world * 4, EXCHANGE_HIDDEN), np.float32))
    one = Tensor(np.ones(world, np.int32))
    single = bc.repeat_exchange(exchange, 1)
    repeated = bc.repeat_exchange(exchange, FIXED_CALLS)
    result["one_row_x1_s"] = best_after_barrier(lambda: single(rows, one).asnumpy(), 30,
                                                group=STEP_REPEATS)
    result["one_row_xN_s"] = best_after_barrier(lambda: repeated(rows, one).asnumpy(), 30,
                                                group=STEP_REPEATS)
    exchange.window.close()
    config = dict(THIN_LAYER, parallel={"expert_parallel": world})
    layer = mee.MoELayer(mee.MoEConfig.from_dict(config))
    layer.set_train(False)
    hidden = THIN_LAYER["model"]["hidden_size"]
    for phase, tokens in (("decode", 1), ("prefill", THIN_PREFILL_TOKENS)):
        x = Tensor(np.random.default_rng(rank).standard_normal((tokens, hidden),
                                                               dtype=np.float32))
        result[f"thin_{phase}_s"] = best_after_barrier(lambda: layer(x, phase).asnumpy(), 30,
                                                       group=STEP_REPEATS)
    layer.close()
    memcpy = bc.make_memcpy(64 << 20)
    result["memcpy_s"] = best_after_barrier(memcpy, 7)
    bc.write_worker_result({"rank": rank, **result})


def msrun_figures(ranks):
    """Slowest rank's figures of msrun_worker at ``ranks`` workers."""
    reports = bc.launch_msrun(os.path.abspath(__file__), ranks, ["--role", "msrun"],
                              timeout_s=600)
    return {key: max(report[key] for report in reports) for key in reports[0] if key != "rank"}


# ---- inter-node stand-in ---------------------------------------------------------------------

def loopback_tcp(megabytes=8):
    """(GB/s, one-way latency us) of a local stream socket pair, with a child reading."""
    parent, child = socket.socketpair()
    payload = b"x" * (megabytes << 20)
    pid = os.fork()
    if pid == 0:
        parent.close()
        for _ in range(4):
            remaining = len(payload)
            while remaining:
                remaining -= len(child.recv(min(remaining, 1 << 20)))
            child.sendall(b"k")
        for _ in range(500):
            child.recv(1)
            child.sendall(b"y")
        os._exit(0)
    child.close()
    best = float("inf")
    for _ in range(4):
        started = time.perf_counter()
        parent.sendall(payload)
        parent.recv(1)
        best = min(best, time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(500):
        parent.sendall(b"z")
        parent.recv(1)
    latency = (time.perf_counter() - started) / 500 / 2 * 1e6
    os.waitpid(pid, 0)
    return len(payload) / best / 1e9, latency


# ---- driver ----------------------------------------------------------------------------------

def _brief(value):
    if isinstance(value, dict):
        return ", ".join(f"{key} {item:.4g}" for key, item in value.items())
    if isinstance(value, tuple):
        return " / ".join(f"{item:.4g}" for item in value)
    return f"{value:.4g}"


def quietly(what, measure, max_other, tries, log):
    """``measure()`` repeated until other processes used at most ``max_other`` cores while it
    ran (the least disturbed try is kept if none was quiet enough); logs what it saw."""
    best = None
    for attempt in range(1, tries + 1):
        with bc.OtherLoad() as other:
            value = measure()
        entry = {"what": what, "try": attempt, "other_cores": round(other.cores, 3),
                 "steal_cores": round(other.steal_cores, 3), "seconds": round(other.wall_s, 1),
                 "load_1m": os.getloadavg()[0]}
        log.append(entry)
        entry["value"] = value
        print(f"[calibrate] {what}: try {attempt}, other processes used "
              f"{other.cores:.2f} cores, steal {other.steal_cores:.2f}: {_brief(value)}",
              flush=True)
        if best is None or other.cores < best[1]:
            best = (value, other.cores, entry)
        if other.cores <= max_other:
            break
    best[2]["kept"] = True
    return best[0]


def expert_call_seconds(rows_per_expert, processes, cores):
    """One core's time for one expert's call of ``rows_per_expert`` rows (EXPERTS_SHAPE), from
    the rate of ``processes`` workers at once (with more workers than cores: the time a core
    spends per call)."""
    hidden, ffn, experts = EXPERTS_SHAPE
    flops, _ = experts_rate((hidden, ffn, experts, rows_per_expert), processes, cores,
                            duration_s=8.0 if rows_per_expert > 64 else 4.0)
    calls_per_second = flops / (6.0 * hidden * ffn * rows_per_expert)
    return min(processes, cores) / calls_per_second


def calibrate(ranks, max_other, tries):
    cores = usable_cores()
    log = []
    figures = {"cores": cores, "ranks": ranks, "load_at_start": os.getloadavg()}
    for rows in ROWS_PER_EXPERT:
        figures[f"expert_call_s_{rows}"] = quietly(
            f"experts, {rows} row(s) per expert, {cores} workers",
            lambda: expert_call_seconds(rows, cores, cores), max_other, tries, log)
    if ranks > cores:
        figures[f"expert_call_s_{ROWS_PER_EXPERT[-1]}_oversubscribed"] = quietly(
            f"experts, {ROWS_PER_EXPERT[-1]} rows per expert, {ranks} workers",
            lambda: expert_call_seconds(ROWS_PER_EXPERT[-1], ranks, cores), max_other, tries,
            log)
    for processes in sorted({cores, ranks}):
        figures[f"msrun_{processes}"] = quietly(f"exchange and thin layer, {processes} ranks",
                                                lambda: msrun_figures(processes), max_other,
                                                tries, log)
    figures["tcp_gbps"], figures["tcp_latency_us"] = loopback_tcp()
    figures["log"] = log
    return figures


def expert_call_model(figures):
    """(GEMV s, pack s, s per row) of one expert's call on one core: t(1) = GEMV + row,
    t(m) = pack + m * row for m >= 2, solved from the calls of 8 and 512 rows."""
    few, many = ROWS_PER_EXPERT[1], ROWS_PER_EXPERT[2]
    t_few, t_many = figures[f"expert_call_s_{few}"], figures[f"expert_call_s_{many}"]
    per_row = (t_many - t_few) / (many - few)
    pack = t_few - few * per_row
    gemv = figures[f"expert_call_s_{ROWS_PER_EXPERT[0]}"] - per_row
    return gemv, pack, per_row


def cluster_from(figures):
    cores, ranks = figures["cores"], figures["ranks"]
    at_cores, at_ranks = figures[f"msrun_{cores}"], figures[f"msrun_{ranks}"]

    def exchange_us(at):
        return (at["one_row_xN_s"] - at["one_row_x1_s"]) / (FIXED_CALLS - 1) * 1e6

    copy_gbps = cores * EXCHANGE_BYTES / at_cores["bulk_s"] / 1e9
    memcpy_gbps = (64 << 20) / at_cores["memcpy_s"] / 1e9
    hidden, ffn, _ = EXPERTS_SHAPE
    weight_bytes = 3.0 * hidden * ffn * 4
    gemv_s, pack_s, row_s = expert_call_model(figures)
    compute = cores * 6.0 * hidden * ffn / row_s / 1e9                 # node GFLOP/s
    key = f"expert_call_s_{ROWS_PER_EXPERT[-1]}_oversubscribed"
    efficiency = (min(1.0, figures[f"expert_call_s_{ROWS_PER_EXPERT[-1]}"] / figures[key])
                  if key in figures else 1.0)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    kept = [entry for entry in figures["log"] if entry.get("kept")]
    other = max(entry["other_cores"] for entry in kept)
    start = figures["load_at_start"]
    # The thin layer's decode step at 1 token, less its two exchange operators: the step's
    # fixed cost (at R = c, and at R = --ranks).
    step_us = at_cores["thin_decode_s"] * 1e6 - 2 * exchange_us(at_cores)
    step_ranks_us = at_ranks["thin_decode_s"] * 1e6 - 2 * exchange_us(at_ranks)
    spec = ClusterSpec(
        name=f"this CPU host ({cores} cores)", cards_per_node=ranks, num_nodes=2,
        cores_per_node=cores,
        intra_node_gbps=round(copy_gbps, 2), intra_node_latency_us=0.0,
        inter_node_gbps=round(figures["tcp_gbps"], 2),
        inter_node_latency_us=round(figures["tcp_latency_us"], 2),
        device_memory_gib=round(memory_gib / ranks, 2),
        memory_gbps=round(cores * weight_bytes / gemv_s / 1e9, 2),
        weight_pack_gbps=round(cores * weight_bytes / pack_s / 1e9, 2),
        operator_overhead_us=round(exchange_us(at_cores), 1),
        oversubscribed_operator_overhead_us=round(exchange_us(at_ranks), 1),
        step_overhead_us=round(max(step_us, 0.0), 1),
        oversubscribed_step_overhead_us=round(max(step_ranks_us, 0.0), 1),
        oversubscribed_compute_efficiency=round(efficiency, 3),
        tflops_float32=round(compute / 1e3, 4), compute_sharing="per_node",
        shared_memory_window=True,
        source=(f"scripts/calibrate_host.py on {time.strftime('%Y-%m-%d %H:%M %Z')}: "
                f"load average {start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f} at the start, "
                f"other processes at most {other:.2f} cores during the kept measurements; "
                f"memcpy {memcpy_gbps:.1f} GB/s per core"))
    # Per token: the thin layer's prefill step at T tokens less its decode step at 1, less
    # what the model already counts for the difference (its experts and copies).
    from dataclasses import replace
    from mindspore_moe_ep.config import MoEConfig
    from mindspore_moe_ep.planning import LayerShape, PlanOptions, estimate
    shape = LayerShape.from_config(MoEConfig.from_dict(
        dict(THIN_LAYER, parallel={"expert_parallel": cores})))
    options = PlanOptions(dispatch_dtype="float32", combine_dtype="float32",
                          compute_dtype="float32")
    modelled = (estimate(shape, spec, cores, "prefill", THIN_PREFILL_TOKENS, options).layer_us
                - estimate(shape, spec, cores, "decode", 1, options).layer_us)
    measured = (at_cores["thin_prefill_s"] - at_cores["thin_decode_s"]) * 1e6
    token_ns = (measured - modelled) / ((THIN_PREFILL_TOKENS - 1) * shape.hidden) * 1e3
    return replace(spec, token_overhead_ns=round(max(token_ns, 0.0), 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--ranks", type=int, default=4,
                        help="ranks the host runs (cards per node in the file)")
    parser.add_argument("--max-other-load", type=float, default=0.1,
                        help="cores other processes may use while a measurement runs")
    parser.add_argument("--tries", type=int, default=4)
    parser.add_argument("--json", help="also write every raw figure here")
    parser.add_argument("--role", choices=["experts", "msrun"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "experts":
        return experts_worker(tuple(int(v) for v in args.shape.split(",")), args.duration,
                              args.go, args.result)
    if args.role == "msrun":
        return msrun_worker()
    if args.ranks < 2:
        parser.error(f"--ranks {args.ranks} is not allowed: expected >= 2 (the exchange is "
                     f"measured between ranks)")
    started = time.time()
    print(f"[calibrate] load average at start: {os.getloadavg()}", flush=True)
    figures = calibrate(args.ranks, args.max_other_load, args.tries)
    spec = cluster_from(figures)
    header = ("This CPU host, measured by scripts/calibrate_host.py through the library's own\n"
              "experts kernel and shared-memory exchange, with the ranks sharing the cores as\n"
              "msrun workers do (see its docstring for what each figure is). Two nodes: the\n"
              "second is the simulated host of tests/test_two_nodes.py.\n"
              f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on "
              f"{bc.machine_info()['cpu_model']}, {figures['cores']} cores.")
    save_cluster(spec, args.out, header=header)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump({"figures": figures, "cluster": spec.as_dict()}, stream, indent=1)
    for key, value in spec.as_dict().items():
        print(f"{key:>34}: {value}")
    print(f"written to {args.out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
