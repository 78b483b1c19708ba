"""Runtime settings from the ``runtime`` config section: execution mode, dtype, device, seed."""
import os

import mindspore as ms

# MindSpore reads this once, when it first queues host work: it must be set before that.
HOST_BLOCKING_RUN_VARIABLE = "MS_DEV_HOST_BLOCKING_RUN"

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def mindspore_dtype(name):
    """'bfloat16' -> ms.bfloat16 (names as in the config's runtime.dtype)."""
    return _DTYPES[name]


def device_target():
    """'Ascend' when an NPU is usable, else 'CPU' (this library's two supported targets)."""
    try:
        if ms.hal.is_available("Ascend"):
            return "Ascend"
    except Exception:  # no Ascend plugin / driver on this host
        pass
    return "CPU"


def ascend_backend_active():
    """Whether the Ascend backend is in use: an NPU is usable and MindSpore targets it.

    ``setup_runtime`` sets MindSpore's device target from :func:`device_target`, so after it the
    two agree; a process that targets the CPU on an NPU host keeps the CPU backend.
    """
    return device_target() == "Ascend" and ms.get_context("device_target") == "Ascend"


def apply_host_blocking_run(enabled):
    """CPU: make MindSpore run host tasks on the calling thread instead of busy-waiting for them.

    MindSpore 2.10 hands each launch to a worker thread and the caller spins until the queue is
    empty (``AsyncRQueue::Wait``): a profile of 4 ranks on 2 cores put 40% of all CPU samples in
    that spin, taken from the ranks doing the work. An explicit setting in the environment wins.
    """
    from .host_defaults import applied_host_defaults
    if enabled and device_target() == "CPU":
        os.environ.setdefault(HOST_BLOCKING_RUN_VARIABLE, "1")
    elif not enabled and HOST_BLOCKING_RUN_VARIABLE in applied_host_defaults():
        # Set at import (host_defaults.py): effective only if MindSpore has not queued work yet.
        os.environ[HOST_BLOCKING_RUN_VARIABLE] = "0"


def setup_runtime(config):
    """Apply ``config.runtime`` to MindSpore: host blocking run, mode, device target and seed.

    Call it before building or running anything (see ``runtime.host_blocking_run``).
    """
    apply_host_blocking_run(config.runtime.host_blocking_run)
    mode = ms.GRAPH_MODE if config.runtime.mode == "graph" else ms.PYNATIVE_MODE
    ms.set_context(mode=mode)
    target = device_target()
    if ms.get_context("device_target") != target:  # MindSpore refuses to set it twice
        ms.set_device(target)
    ms.set_seed(config.runtime.seed)
