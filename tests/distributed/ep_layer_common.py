"""What the expert-parallel layer workers share (see ep_layer_worker.py): the configs, seeds and
tolerances of the checks, the execution modes, and the driver that runs a worker's parts under
msrun and writes each rank's report.

Inputs are deterministic functions of (seed, source rank), so every rank regenerates every
rank's inputs and computes what it must receive or return without any extra communication.
"""
import argparse
import os
import time
import traceback

import launch  # tests/distributed/launch.py, next to this script
from checks import CheckReport  # tests/distributed/checks.py

import mindspore as ms
from mindspore.communication import get_group_size, get_rank, init

import mindspore_moe_ep as mee

REPOSITORY_ROOT = launch.REPOSITORY_ROOT
TINY = os.path.join(REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
DEEPSEEK = os.path.join(REPOSITORY_ROOT, "yaml_configs", "deepseek_v3_small_4cpu.yaml")
MASTER_SEED = 20240611

# Tolerances (max |actual - expected| / max |expected|), float32 throughout.
COMBINE_REL_TOL = 2e-6   # per element, relative to sum_k |w (e + 1) x|: a few float32 roundings
LAYER_REL_TOL = 1e-5     # EP vs EP = 1 forward: the same arithmetic up to summation order
# bfloat16 layers: each expert rank rounds its partial sum of a token to bfloat16 before the
# source adds them (EP = 1 rounds the token's whole sum once): up to ~2 bfloat16 ulps (2^-8
# relative each) of the output apart (measured 6.6e-3 at world 4, tiny.yaml)
BF16_LAYER_REL_TOL = 1.6e-2
GRAD_REL_TOL = 5e-5      # EP vs EP = 1 gradients (sums over ranks in another order)
BAD_TIMEOUT_S = 3.0      # dispatch.timeout_s of the layers that are made to fail
REPEATS = 2              # extra runs of every layer forward / gradient, compared bitwise


def graph_modes(world, everywhere=False):
    """Modes of a case: GRAPH_MODE compiles cost 1-5 s each, and a world of 4 on 2 cores runs
    them about twice as slowly, so most graph-mode cases run only with 2 ranks."""
    return ("pynative", "graph") if everywhere or world <= 2 else ("pynative",)


def set_mode(report, mode):
    report.mode = mode
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)


def single_process(config):
    """The EP = 1 counterpart of an expert-parallel config: it takes the whole world's batch,
    so its buffers must hold max_tokens_per_rank rows from every rank."""
    rows = config.dispatch.max_tokens_per_rank * get_group_size()
    return config.replace(expert_parallel=1, max_tokens_per_rank=rows)


def load(path=TINY, **overrides):
    return mee.load_config(path, **overrides)


def numpy_of(tensor):
    return tensor.astype(ms.float32).asnumpy()


def tiny_layer_config(world, **overrides):
    settings = dict(expert_parallel=world, max_tokens_per_rank=32, decode_token_threshold=32)
    settings.update(overrides)
    return load(TINY, **settings)


def deepseek_layer_config(world, **overrides):
    settings = dict(expert_parallel=world, hidden_size=64, expert_ffn_size=32,
                    max_tokens_per_rank=32, decode_token_threshold=32)
    settings.update(overrides)
    return load(DEEPSEEK, **settings)


def run_parts(part_functions):
    """The worker's main: runs the parts chosen with ``--parts a,b,...`` (default: every part of
    ``part_functions``, in its order) in PYNATIVE_MODE first, and writes this rank's report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default=",".join(part_functions))
    parts = [part for part in parser.parse_args().parts.split(",") if part]
    started = time.monotonic()
    ms.set_device("CPU")
    init()
    rank, world = get_rank(), get_group_size()
    report = CheckReport()
    set_mode(report, "pynative")
    for part in parts:
        part_started = time.monotonic()
        try:
            part_functions[part](report, rank, world)
        except Exception:  # a part that fails outside its cases is a failed check too
            report.check(f"{part}/part", False, traceback.format_exc()[-2000:])
        report.values[f"part_seconds/{part}"] = round(time.monotonic() - part_started, 2)
    report.values["total_s"] = round(time.monotonic() - started, 2)
    launch.write_result({"rank": rank, "world": world, "parts": parts, "checks": report.checks,
                         **report.values})
