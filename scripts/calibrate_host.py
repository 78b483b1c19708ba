#!/usr/bin/env python3
"""Measure this CPU host for the planner and write its cluster file (~15 s).

    python scripts/calibrate_host.py [--out yaml_configs/clusters/cpu_host.yaml] [--ranks 4]

What it measures, one process at a time (the host's ranks share its cores, so the file says
``compute_sharing: per_node``):

- intra-node bandwidth: one core copying 64 MiB with NumPy (the exchange's single copy is a
  copy of the same kind; docs/performance.md puts process_vm_readv at ~0.6x memcpy on this VM,
  which the number does not include: the planner's CPU rows are an optimistic bound);
- intra-node latency: half a round trip of one byte between two processes over a pipe;
- operator overhead: one PyNative MindSpore operator call on a tiny tensor (what every
  exchange operator pays at least once);
- compute: float32 GEMM throughput of NumPy on 1024 x 1024 x 1024 with every core;
- memory bandwidth: the same copy as above with every core's share.

The inter-node figures are those of the loopback TCP the simulated second host uses (a
``socket.socketpair`` stream of 8 MiB), so the planner can cost the cross-host path on this
machine (docs/scaling.md).
"""
import argparse
import os
import socket
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindspore_moe_ep.planning import ClusterSpec, save_cluster  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "yaml_configs", "clusters", "cpu_host.yaml")


def best_seconds(body, repeats):
    """The fastest of ``repeats`` timed calls (the least disturbed by other jobs)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        body()
        best = min(best, time.perf_counter() - started)
    return best


def copy_gbps(megabytes=64):
    source = np.ones(megabytes << 18, np.float32)
    target = np.empty_like(source)
    seconds = best_seconds(lambda: np.copyto(target, source), 7)
    return source.nbytes / seconds / 1e9


def pipe_latency_us(rounds=2000):
    """Half a one-byte round trip between this process and a child, over two pipes."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        for _ in range(rounds):
            os.read(to_child, 1)
            os.write(from_child, b"x")
        os._exit(0)
    started = time.perf_counter()
    for _ in range(rounds):
        os.write(from_parent, b"x")
        os.read(to_parent, 1)
    elapsed = time.perf_counter() - started
    os.waitpid(pid, 0)
    return elapsed / rounds / 2 * 1e6


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


def operator_overhead_us():
    import mindspore as ms
    from mindspore import Tensor, ops
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    x = Tensor(np.ones((4, 4), np.float32))
    ops.add(x, x).asnumpy()
    return best_seconds(lambda: ops.add(x, x).asnumpy(), 200) * 1e6


def gemm_tflops(size=1024):
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    b = a.copy()
    seconds = best_seconds(lambda: a @ b, 5)
    return 2 * size ** 3 / seconds / 1e12


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--ranks", type=int, default=4,
                        help="ranks the host runs (cards per node in the file)")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks {args.ranks} is not allowed: expected >= 1")
    started = time.time()
    memcpy = copy_gbps()
    latency = pipe_latency_us()
    tcp_gbps, tcp_latency = loopback_tcp()
    overhead = operator_overhead_us()
    tflops = gemm_tflops()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    spec = ClusterSpec(
        name=f"this CPU host ({os.cpu_count()} cores)", cards_per_node=args.ranks, num_nodes=2,
        intra_node_gbps=round(memcpy, 2), intra_node_latency_us=round(latency, 2),
        inter_node_gbps=round(tcp_gbps, 2), inter_node_latency_us=round(tcp_latency, 2),
        device_memory_gib=round(memory_gib / args.ranks, 2), memory_gbps=round(memcpy, 2),
        operator_overhead_us=round(overhead, 1), tflops_float32=round(tflops, 4),
        compute_sharing="per_node", shared_memory_window=True,
        source=f"scripts/calibrate_host.py on {time.strftime('%Y-%m-%d %H:%M')}, load "
               f"{os.getloadavg()[0]:.1f}")
    save_cluster(spec, args.out, header=(
        "This CPU host, measured by scripts/calibrate_host.py (see its docstring for what each\n"
        "figure is). Two nodes: the second is the simulated host of tests/test_two_nodes.py."))
    for key, value in spec.as_dict().items():
        print(f"{key:>22}: {value}")
    print(f"written to {args.out} in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
