"""A short soak for CI (scripts/soak.py runs the long one): 2,000 GRAPH_MODE decode steps at EP 2
with flat memory and unchanged output, then 10 layer rebuilds that leave no window and no
/dev/shm behind. Worker: tests/distributed/soak_worker.py.
"""
import os

from distributed import launch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed",
                      "soak_worker.py")
# Resident memory may grow by allocator noise, not per step: 16 MiB over 2,000 steps would be
# 8 KiB per step, more than a leak of one token row per step (64 B here) could explain, and far
# less than a leaked window, graph or buffer per step would cost.
RSS_GROWTH_BOUND = 16 << 20


def test_decode_soak_and_rebuild_loop():
    with launch.msrun_reports(WORKER, 2, ["--steps", "2000", "--rebuilds", "10"],
                              timeout_s=300) as result:
        for report in result.results.values():
            assert report["same_output"], report
            growth = report["rss_after_steps"] - report["rss_after_warmup"]
            assert growth < RSS_GROWTH_BOUND, (growth, report)
            assert report["windows_after_rebuilds"] == report["windows_before_rebuilds"], report
            # Window segments this process still maps (its own view: other jobs do not count).
            assert report["shm_after_rebuilds"] == report["shm_before_rebuilds"] == 0, report
