#!/usr/bin/env python
"""The long soak: many thousand GRAPH_MODE decode steps and many layer rebuilds under msrun.

    python scripts/soak.py [--workers 2] [--steps 20000] [--rebuilds 200]

Runs tests/distributed/soak_worker.py (the CI test tests/test_soak.py runs it short) and prints
per rank the resident memory growth over the steps, the windows and window bytes mapped before and
after the rebuilds, and the time taken; exits 1 if memory grew by more than 16 MiB, the output
changed, or a window or window memory was left mapped.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from distributed import launch  # noqa: E402

RSS_GROWTH_BOUND = 16 << 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--rebuilds", type=int, default=200)
    args = parser.parse_args(argv)
    worker = os.path.join(os.path.dirname(HERE), "tests", "distributed", "soak_worker.py")
    print(f"soak: {args.workers} workers, {args.steps} decode steps, {args.rebuilds} rebuilds",
          flush=True)
    result = launch.run_msrun(worker, args.workers,
                              ["--steps", str(args.steps), "--rebuilds", str(args.rebuilds)],
                              timeout_s=3600)
    if result.returncode != 0 or len(result.results) != args.workers:
        print(result.describe())
        return 1
    ok = True
    for rank, report in sorted(result.results.items()):
        growth = report["rss_after_steps"] - report["rss_after_warmup"]
        windows = report["windows_after_rebuilds"] - report["windows_before_rebuilds"]
        print(f"rank {rank}: RSS {report['rss_after_warmup'] / 2**20:.1f} -> "
              f"{report['rss_after_steps'] / 2**20:.1f} MiB ({growth / 2**10:+.0f} KiB), "
              f"output unchanged: {report['same_output']}, windows left: {windows}, "
              f"window bytes still mapped: {report['shm_after_rebuilds']}, {report['seconds']} s")
        ok &= (growth < RSS_GROWTH_BOUND and report["same_output"] and windows == 0
               and report["shm_after_rebuilds"] == 0)
    launch.remove_launch_files(result)
    print("soak passed" if ok else "soak FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
