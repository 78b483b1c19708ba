"""What scripts/train.py, scripts/generate.py and the LM benchmark share: the command line's
config overrides, starting MindSpore (one process or an msrun worker), and rank-0 logging."""
import argparse
import os
import sys
from dataclasses import dataclass

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a fresh clone without installing
    sys.path.insert(0, REPO)


def add_run_arguments(parser):
    """The main job's overrides: config, --expert-parallel, --mode, --set KEY=VALUE."""
    parser.add_argument("config", help="YAML config with an lm section (see yaml_configs/)")
    parser.add_argument("--expert-parallel", type=int, default=None,
                        help="override parallel.expert_parallel (default: the world size, i.e. "
                             "msrun's worker count; 1 in a plain process)")
    parser.add_argument("--mode", choices=["graph", "pynative"], default=None,
                        help="override runtime.mode")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.steps=20 (YAML value)")


@dataclass
class Run:
    """A started run: the validated config and this process's place in the world."""

    config: object
    rank: int
    world_size: int

    def log(self, message, prefix):
        if self.rank == 0:
            print(f"[{prefix}] {message}", flush=True)


def world_size_from_environment():
    """msrun's worker count (1 in a plain process)."""
    return int(os.environ.get("MS_WORKER_NUM", os.environ.get("RANK_SIZE", "1")))


def parse_overrides(args, world_size):
    """The config overrides of the command line (``--set`` values are read as YAML)."""
    overrides = {}
    for item in args.set:
        key, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=20")
        overrides[key.strip()] = yaml.safe_load(value)
    overrides["parallel.expert_parallel"] = (args.expert_parallel if args.expert_parallel
                                             is not None else world_size)
    if args.mode is not None:
        overrides["runtime.mode"] = args.mode
    return overrides


def start_run(args):
    """Load and validate the config, apply its runtime settings, join the msrun world."""
    import mindspore_moe_ep as mee
    from mindspore_moe_ep.comm.window import distributed_initialized

    world_size = world_size_from_environment()
    try:
        config = mee.load_config(args.config, **parse_overrides(args, world_size))
        config.parallel.data_parallel_size(world_size)
    except mee.ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    mee.setup_runtime(config)
    rank = 0
    if world_size > 1:
        from mindspore.communication import get_rank, init
        if not distributed_initialized():
            init()
        rank = get_rank()
    return Run(config, rank, world_size)


def shard_rows(array, rank, world_size, what):
    """Rank ``rank``'s equal share of ``array``'s rows; ``what`` names the size in the error."""
    if array.shape[0] % world_size:
        raise SystemExit(f"error: {what} = {array.shape[0]} is not divisible by the world size "
                         f"{world_size}; every rank takes an equal share")
    per_rank = array.shape[0] // world_size
    return array[rank * per_rank:(rank + 1) * per_rank]


def new_parser(description):
    return argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
