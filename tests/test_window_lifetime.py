"""Nothing is left behind: windows released when their layer goes, segments unlinked when the
creating rank dies before its peers attached.

- A killed creator (kill -9 while a peer has not attached yet: msrun stopping a job while a rank
  is still compiling) leaves no /dev/shm segment: the creator's watcher unlinks it within a
  fraction of a second (comm_window_lifecycle.cc, StartSegmentReaper).
- Rebuilding a layer many times (the recovery after a failed step) does not accumulate windows:
  a layer's windows close when it is garbage-collected or on ``layer.close()``.
"""
import gc
import os
import secrets
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest

import mindspore_moe_ep as mee
from mindspore_moe_ep.comm import window

SHM_DIR = "/dev/shm"
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yaml_configs",
                    "tiny.yaml")
REAPER_BOUND_S = 2.0  # the watcher polls every 0.2 s; 10x that for a loaded 2-core machine

CREATOR = """
import sys
from mindspore_moe_ep.comm.window import CommWindow
CommWindow.open([0, 1], 0, 4096, attach_timeout_s=60, job_token=sys.argv[1])
"""


def wait_until(condition, bound_s):
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_killed_creator_leaves_no_segment():
    token = secrets.token_hex(16)
    path = os.path.join(SHM_DIR, "moe-ep-" + token)
    creator = subprocess.Popen([sys.executable, "-c", CREATOR, token],
                               env=dict(os.environ, GLOG_v="3"))
    try:
        assert wait_until(lambda: os.path.exists(path), 60), "the creator never made its segment"
        time.sleep(0.3)  # the creator now waits for rank 1, which never comes
        creator.send_signal(signal.SIGKILL)
        creator.wait()
        killed_at = time.monotonic()
        assert wait_until(lambda: not os.path.exists(path), REAPER_BOUND_S), \
            f"{path} still exists {REAPER_BOUND_S} s after its creator was killed"
        print(f"segment gone {time.monotonic() - killed_at:.2f} s after kill -9")
    finally:
        if creator.poll() is None:
            creator.kill()
        if os.path.exists(path):
            os.unlink(path)


def test_watcher_leaves_a_live_creators_segment_alone():
    """While the creator lives and waits for its peers, its watcher must not unlink the segment
    (its end after a successful attach is covered by the distributed suites, which leave nothing
    in /dev/shm)."""
    token = secrets.token_hex(16)
    path = os.path.join(SHM_DIR, "moe-ep-" + token)
    creator = subprocess.Popen([sys.executable, "-c", CREATOR, token],
                               env=dict(os.environ, GLOG_v="3"))
    try:
        assert wait_until(lambda: os.path.exists(path), 60)
        time.sleep(1.0)  # five polls of the watcher
        assert os.path.exists(path), "the watcher unlinked a live creator's segment"
    finally:
        creator.kill()
        creator.wait()
        wait_until(lambda: not os.path.exists(path), REAPER_BOUND_S)
        if os.path.exists(path):
            os.unlink(path)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_rebuilding_layers_does_not_accumulate_windows(mode):
    """EP 1 layers have no window; a one-rank window opened by hand stands in for the layer's
    (the multi-rank rebuild loop runs in tests/distributed): the finaliser closes it."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    gc.collect()
    before = window.open_window_count()
    for _ in range(20):
        opened = window.CommWindow.open([0], 0, 4096)
        assert window.open_window_count() == before + 1
        del opened
        gc.collect()
    assert window.open_window_count() == before
    layer = mee.MoELayer(mee.load_config(TINY, mode=mode))
    layer(ms.Tensor(np.ones((4, 16), np.float32)))
    layer.close()  # nothing to release at EP 1, and safe to call
    layer.close()


def test_peers_learn_at_once_why_rank_0_could_not_create_the_window():
    """Rank 0's creation fails in the kernel library (here: a window larger than /dev/shm,
    asked for below the Python-side check); the rank waiting to attach fails at once with rank
    0's reason instead of waiting attach_timeout_s, and the notice is removed afterwards."""
    token = secrets.token_hex(16)
    path = os.path.join(SHM_DIR, "moe-ep-" + token)
    library = window._window_library()
    huge_slot = 1 << 40

    def open_as(rank, attach_timeout_s):
        return library.MoeEpWindowOpen(token.encode(), 2, rank, huge_slot, 60.0,
                                       attach_timeout_s, b"dispatch.timeout_s", 1)

    try:
        assert open_as(0, 1.0) < 0
        assert "are available" in window._last_error()
        started = time.monotonic()
        assert open_as(1, 30.0) < 0
        waited = time.monotonic() - started
        message = window._last_error()
        assert "rank 0 could not create the communication window" in message, message
        assert "are available" in message, message
        assert waited < 2.0, waited  # not attach_timeout_s (30 s)
        # The notice's watcher removes it when its lifetime (attach_timeout_s + 5 s) ends.
        assert wait_until(lambda: not os.path.exists(path), 6.0 + REAPER_BOUND_S)
    finally:
        if os.path.exists(path):
            os.unlink(path)
