"""Checkpoints of an expert-parallel model that load at any expert-parallel size.

A checkpoint is a directory ``step_NNNNNN/`` with

- ``rank_<r>.ckpt`` for each expert-parallel rank r = 0 .. R-1 (MindSpore checkpoint files,
  written by data-parallel replica 0): rank r's expert slots of every MoE layer (stacked on
  axis 0: the experts ``[r E/R, (r+1) E/R)`` under the static placement; after a
  ``rebalance()`` the layer's placement, which ``meta.json`` records per parameter as
  ``expert_slots``) and their AdamW moments; ``rank_0.ckpt`` also holds
  everything replicated (attention, norms, embeddings, routers with their expert bias, dense
  FFNs, shared experts, their moments and the optimiser step), once;
- ``meta.json``: the config, the step, the EP and DP sizes, the data position and the expert
  placement.

Loading gathers each logical expert from a slot that holds it into the loading model's own
placement (its initial one: a rebalanced placement is not restored, the numbers are).

``DIR/latest`` names the newest complete checkpoint of a run; it is written last, so a run killed
while saving leaves the previous one in place. Loading at another EP size gathers each rank's
experts from the files that hold them (resharding); KV caches and the layers' statistics are
not model state and are never saved. A checkpoint that does not fit the model is refused with
an error naming the file, the key and both values.
"""
import json
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..comm.window import distributed_initialized, world_all_gather

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")
MUST_MATCH = ("model", "router", "lm")  # config sections that define the model
# ... except the keys that only size a run or steer training: they may differ on load.
MAY_DIFFER = {"lm.max_batch_size", "lm.max_seq_len", "router.bias_update_rate",
              "router.aux_loss_type", "router.aux_loss_coeff", "router.z_loss_coeff",
              "router.capacity_factor"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or made for another model."""


def rank_file_name(group_rank):
    return f"rank_{group_rank}.ckpt"


def step_directory_name(step):
    return f"step_{step:06d}"


def is_model_state(name):
    """Whether a Parameter is saved: not a KV cache, not a layer's statistic (last forward,
    load window), not a replica table."""
    leaf = name.rsplit(".", 1)[-1]
    return (leaf not in ("k_cache", "v_cache", "load_history", "load_steps",
                         "slot_load_history", "replica_grad_sum")
            and not leaf.startswith("last_")
            and "replica_selector." not in name)  # per-rank tables, rebuilt from the placement


def _base_name(name):
    """The model parameter an optimiser moment belongs to (``adam_m.x`` -> ``x``)."""
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _state(model, optimizer):
    """[(key, Parameter)] to save or load. Keys are names relative to the model (a Parameter's
    own name changes when the model is wrapped in another Cell), ``adam_m.<key>`` /
    ``adam_v.<key>`` for the AdamW moments of a parameter and ``adam_step``."""
    names = {id(param): name for name, param in model.parameters_and_names()}
    state = [(name, param) for name, param in model.parameters_and_names()
             if is_model_state(name)]
    if optimizer is not None:
        for param, exp_avg, exp_avg_sq in zip(optimizer.params, optimizer.exp_avg,
                                              optimizer.exp_avg_sq):
            state += [("adam_m." + names[id(param)], exp_avg),
                      ("adam_v." + names[id(param)], exp_avg_sq)]
        state.append(("adam_step", optimizer.step))
    return state


def _expert_layers(model):
    """{key: its MoE layer} of the routed experts' Parameters (stacked [local slots, ...]) of
    every layer."""
    layer_of = {id(param): layer for layer in model.moe_layers()
                for param in layer.experts.get_parameters()}
    return {name: layer_of[id(param)] for name, param in model.parameters_and_names()
            if id(param) in layer_of}


def _barrier():
    if distributed_initialized():
        world_all_gather(np.zeros(1, np.int32))


def save_checkpoint(directory, step, model, optimizer, config, extra=None):
    """Write ``directory/step_NNNNNN`` and point ``directory/latest`` at it (every rank calls).

    ``extra``: more metadata for ``meta.json`` (the data position, metrics). Returns the path.
    """
    group = model.moe_layers()[0].group
    path = os.path.join(directory, step_directory_name(step))
    os.makedirs(path, exist_ok=True)
    experts = _expert_layers(model)
    if group.rank == group.group_rank:  # data-parallel replica 0 writes; replicas are copies
        entries = [{"name": name, "data": param} for name, param in _state(model, optimizer)
                   if _base_name(name) in experts or group.group_rank == 0]
        target = os.path.join(path, rank_file_name(group.group_rank))
        partial = os.path.join(path, f"partial_{rank_file_name(group.group_rank)}")
        ms.save_checkpoint(entries, partial)
        os.replace(partial, target)
    _barrier()
    if group.rank == 0:
        per_rank = group.experts_per_rank  # slots: logical experts in expert_slots
        meta = {
            "format": FORMAT_VERSION, "step": step, "config": config.to_dict(),
            "expert_parallel": group.size, "data_parallel": group.world_size // group.size,
            "world_size": group.world_size,
            "files": [rank_file_name(rank) for rank in range(group.size)],
            "expert_placement": {rank_file_name(rank): [rank * per_rank, (rank + 1) * per_rank]
                                 for rank in range(group.size)},
            "expert_parameters": sorted(experts),
            "expert_slots": {name: list(layer.placement.slot_experts)
                             for name, layer in experts.items()},
            **(extra or {}),
        }
        _write_atomically(os.path.join(path, META_FILE), json.dumps(meta, indent=1))
        _write_atomically(os.path.join(directory, LATEST_FILE), step_directory_name(step) + "\n")
    _barrier()
    return path


def _write_atomically(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def resolve_checkpoint(path):
    """The step directory of ``path``: itself if it holds meta.json, else the one its
    ``latest`` file names."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as handle:
            return os.path.join(path, handle.read().strip())
    raise CheckpointError(f"no checkpoint at '{path}': expected '{os.path.join(path, META_FILE)}'"
                          f" or a '{LATEST_FILE}' file naming a step directory")


def read_meta(path):
    """(step directory, its meta.json as a dict) of the checkpoint at ``path``."""
    step_dir = resolve_checkpoint(path)
    meta_path = os.path.join(step_dir, META_FILE)
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{meta_path}: cannot read the checkpoint's metadata: {error}") \
            from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: key 'format' is {meta.get('format')!r}, this "
                              f"library reads {FORMAT_VERSION}")
    return step_dir, meta


def check_config_matches(meta_path, saved_config, config):
    """Refuse a checkpoint saved with other model, router or lm settings (or dtype), but for
    the ``MAY_DIFFER`` keys (cache sizes, training-only router settings)."""
    current = config.to_dict()
    keys = [(section, key) for section in MUST_MATCH for key in current[section]
            if f"{section}.{key}" not in MAY_DIFFER]
    for section, key in keys + [("runtime", "dtype")]:
        saved = saved_config.get(section, {}).get(key)
        if saved != current[section][key]:
            raise CheckpointError(
                f"{meta_path}: the checkpoint was saved with {section}.{key} = {saved!r}, but "
                f"the config has {section}.{key} = {current[section][key]!r} (load it with the "
                f"config it was trained with)")


def load_checkpoint(path, model, optimizer=None, config=None):
    """Load the checkpoint at ``path`` (a step directory, or a run directory with ``latest``)
    into ``model`` (and ``optimizer``), whatever the EP size it was saved at. Returns meta."""
    step_dir, meta = read_meta(path)
    config = config or model.config
    check_config_matches(os.path.join(step_dir, META_FILE), meta["config"], config)
    files = [os.path.join(step_dir, name) for name in meta["files"]]
    for file in files:
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: rank file missing; the checkpoint was saved at "
                                  f"expert_parallel = {meta['expert_parallel']} and needs "
                                  f"{', '.join(meta['files'])}")
    reader = _RankFiles(files, config.model.num_experts, meta.get("expert_slots", {}))
    experts = _expert_layers(model)
    for name, param in _state(model, optimizer):
        if _base_name(name) in experts:
            value, source = reader.experts(name,
                                           experts[_base_name(name)].local_expert_indices)
        else:
            value, source = reader.replicated(name)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: key '{name}' has shape {tuple(value.shape)}, but "
                                  f"the model's is {tuple(param.shape)}")
        param.set_data(Tensor(value).astype(param.dtype))
    reader.check_all_used(optimizer is not None)
    return meta


class _RankFiles:
    """Reads the rank files of a checkpoint on demand; gathers experts across them."""

    def __init__(self, files, num_experts, expert_slots):
        self.files = files
        self.num_experts = num_experts
        self.expert_slots = expert_slots  # {parameter: [slot expert]} (absent: static)
        self.loaded = {}
        self.used = set()

    def _file(self, index):
        if index not in self.loaded:
            self.loaded[index] = {name: param.asnumpy() for name, param in
                                  ms.load_checkpoint(self.files[index]).items()}
        return self.loaded[index]

    def _get(self, index, name):
        values = self._file(index)
        if name not in values:
            raise CheckpointError(f"{self.files[index]}: key '{name}' is missing (the model has "
                                  f"it: a checkpoint of another model?)")
        self.used.add(name)
        return values[name]

    def replicated(self, name):
        return self._get(0, name), self.files[0]

    def experts(self, name, expert_indices):
        """[len(expert_indices), ...]: the rows of those logical experts, each from the first
        slot that holds it in the saved placement (static: expert e in slot e)."""
        slots = self.expert_slots.get(_base_name(name), list(range(self.num_experts)))
        per_file = len(slots) // len(self.files)
        first_slot = [slots.index(expert) for expert in expert_indices]
        rows = [self._get(slot // per_file, name)[slot % per_file] for slot in first_slot]
        return np.stack(rows), self.files[first_slot[0] // per_file]

    def check_all_used(self, with_optimizer):
        """Refuse keys of the checkpoint that the model does not have (another model)."""
        for index in sorted(self.loaded):
            for name in self.loaded[index]:
                if name in self.used or (not with_optimizer and _is_optimizer_key(name)):
                    continue
                raise CheckpointError(f"{self.files[index]}: key '{name}' is not in the model "
                                      f"(a checkpoint of another model?)")


def _is_optimizer_key(name):
    return name.startswith(OPTIMIZER_PREFIXES) or name == "adam_step"
