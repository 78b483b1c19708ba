"""An expert-parallel MoELayer against its single-process (EP = 1) counterpart with the same
weights: the cells that run a layer's forward and gradients (one per layer, so that GRAPH_MODE
compiles each once), the per-source inputs, and the checks of outputs, statistics and gradients
(each repeated and compared bitwise: determinism)."""
import os
import sys

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

import mindspore_moe_ep as mee
from mindspore_moe_ep.comm.window import world_all_gather

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from reference.numpy_replicas import reference_slots  # noqa: E402

from ep_layer_common import GRAD_REL_TOL, LAYER_REL_TOL, MASTER_SEED, REPEATS, numpy_of, set_mode


class Forward(nn.Cell):
    """layer(x, phase) as one graph."""

    def __init__(self, layer, phase):
        super().__init__()
        self.layer = layer
        self.phase = phase

    def construct(self, x):
        return self.layer(x, self.phase)


class LossCell(nn.Cell):
    """sum(layer(x, "prefill") * g); the layer adds the aux / z-loss gradients itself."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, g):
        return (self.layer(x, "prefill") * g).sum()


class GradCell(nn.Cell):
    """Gradients of a LossCell w.r.t. (x, g) and every trainable parameter."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.weights = ms.ParameterTuple(net.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x, g):
        return self.grad(self.net, self.weights)(x, g)


_CELL_CACHE = {}


def forward_cell(layer, phase):
    """One Forward cell per (layer, phase): GRAPH_MODE compiles each cell once."""
    key = ("forward", id(layer), phase)
    if key not in _CELL_CACHE:
        _CELL_CACHE[key] = (layer, Forward(layer, phase))
    return _CELL_CACHE[key][1]


def gradient_cells(layer):
    """(GradCell of LossCell(layer), ExpertParallelGradReducer(layer)), one pair per layer.

    The reducer is built after the wrapping Cells have renamed the layer's parameters
    ("experts.x" -> "net.layer.experts.x"): it must still tell expert parameters apart.
    """
    key = ("grad", id(layer))
    if key not in _CELL_CACHE:
        grad_cell = GradCell(LossCell(layer))
        _CELL_CACHE[key] = (layer, (grad_cell, mee.ExpertParallelGradReducer(layer)))
    return _CELL_CACHE[key][1]


def layer_inputs(seed, shapes, hidden):
    """Per-source inputs [shape + (H,)] and loss weights G, float32, from (seed, source)."""
    inputs = []
    for source, shape in enumerate(shapes):
        rng = np.random.default_rng([MASTER_SEED, seed, source])
        full = tuple(shape) + (hidden,)
        inputs.append((rng.standard_normal(full).astype(np.float32),
                       rng.standard_normal(full).astype(np.float32)))
    return inputs


def set_expert_bias(layers, seed, experts):
    """The same non-zero selection bias in every layer (exercises the biased choice)."""
    bias = np.random.default_rng([MASTER_SEED, seed]).uniform(-0.05, 0.05, experts)
    for layer in layers:
        layer.router.expert_bias.set_data(Tensor(bias.astype(np.float32)))


def flat(x):
    return x.reshape(-1, x.shape[-1])


def reference_forward(ref_layer, xs, members, phase):
    """EP = 1 output of the concatenated batch of `members`, split back per member."""
    batch = np.concatenate([flat(xs[member]) for member in members])
    y = numpy_of(ref_layer(Tensor(batch), phase))
    stats = ref_layer.stats()
    outputs, offset = {}, 0
    for member in members:
        count = flat(xs[member]).shape[0]
        outputs[member] = y[offset:offset + count].reshape(xs[member].shape)
        offset += count
    return outputs, stats


def expected_slot_rows(layer, ref_layer, xs, ref_stats):
    """[S] rows each of this rank's slots must compute: from the EP = 1 statistics under the
    static placement, else by the replica rule over every group member's routed tokens."""
    group = layer.group
    slot_experts = list(layer.placement.slot_experts)
    if slot_experts == list(range(group.num_experts)):
        start = group.group_rank * group.experts_per_rank
        return ref_stats["tokens_per_expert"][start:start + group.experts_per_rank]
    rows = np.zeros(group.num_slots, np.int64)
    for member_rank, member in enumerate(group.group_ranks):
        if flat(xs[member]).shape[0] == 0:
            continue
        expert_ids, _ = ref_layer.route(Tensor(flat(xs[member])))
        slots = reference_slots(expert_ids.asnumpy(), slot_experts, group.experts_per_rank,
                                member_rank)
        rows += np.bincount(slots.reshape(-1), minlength=group.num_slots)
    start = group.group_rank * group.experts_per_rank
    return rows[start:start + group.experts_per_rank]


def check_layer_forward(report, case, layer, ref_layer, xs, rank, phase, mode, reference=None,
                        rel_tol=LAYER_REL_TOL, kind="layer_output"):
    """EP output and statistics vs EP = 1 on the concatenated batch of this rank's group.

    Returns the EP output. ``reference`` caches (outputs, stats) of the EP = 1 layer, computed
    once in PYNATIVE_MODE. The output within ``rel_tol`` (its scaled error kept as
    max_error/``kind``), the statistics exactly.
    """
    group = layer.group
    members = list(group.group_ranks)
    if reference is None:
        reference = reference_forward(ref_layer, xs, members, phase)
    expected, ref_stats = reference
    x = Tensor(xs[rank])
    y = numpy_of(forward_cell(layer, phase)(x) if mode == "graph" else layer(x, phase))
    report.close(f"{case}/output", y, expected[rank], rel_tol, kind)
    stats = layer.stats()
    report.equal(f"{case}/tokens_per_expert", stats["tokens_per_expert"],
                 expected_slot_rows(layer, ref_layer, xs, ref_stats))
    # routed_per_expert and num_dropped are per rank: their sums over the group are the
    # single-process values (a world AllGather; every rank runs the same cases).
    gathered = world_all_gather(np.concatenate([stats["routed_per_expert"],
                                                [stats["num_dropped"]]]))
    group_sum = gathered[members].sum(axis=0)
    report.equal(f"{case}/routed_per_expert_over_group", group_sum[:-1],
                 ref_stats["routed_per_expert"])
    report.equal(f"{case}/num_dropped_over_group", group_sum[-1], ref_stats["num_dropped"])
    for repeat in range(REPEATS):   # determinism: the same output, bit for bit
        again = numpy_of(forward_cell(layer, phase)(x) if mode == "graph" else layer(x, phase))
        report.equal(f"determinism/{case}/repeat{repeat}", again, y)
    return y, reference


def ep_gradients(layer, x, g):
    """(dx, reduced parameter gradients) of this rank's loss under EP, after the reducer."""
    grad_cell, reducer = gradient_cells(layer)
    (dx, _), grads = grad_cell(Tensor(x), Tensor(g))
    return numpy_of(dx), [numpy_of(grad) for grad in reducer(grads)]


def reference_gradients(ref_layer, inputs, concatenate=False):
    """EP = 1: (dx of every source, parameter gradients of L = sum over sources of L_s).

    Default: one backward per source batch (each rank's router losses cover its own tokens).
    ``concatenate``: one backward over the concatenated batch (needed with a capacity factor,
    where drops depend on the whole group's batch; only valid without router losses).
    """
    grad_cell, _ = gradient_cells(ref_layer)
    if concatenate:
        x = np.concatenate([x for x, _ in inputs])
        g = np.concatenate([g for _, g in inputs])
        (dx, _), grads = grad_cell(Tensor(x), Tensor(g))
        bounds = np.cumsum([0] + [len(x) for x, _ in inputs])
        dx = numpy_of(dx)
        return ([dx[bounds[i]:bounds[i + 1]] for i in range(len(inputs))],
                [numpy_of(grad).astype(np.float64) for grad in grads])
    dxs, total = [], None
    for x, g in inputs:
        if x.shape[0] == 0:  # no tokens, no router losses: L_s = 0 (MindSpore's backward of
            dxs.append(np.zeros_like(x))  # an empty batch fails in ScatterNd's shape check)
            continue
        (dx, _), grads = grad_cell(Tensor(x), Tensor(g))
        dxs.append(numpy_of(dx))
        grads = [numpy_of(grad).astype(np.float64) for grad in grads]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return dxs, total


def check_gradients(report, case, layer, ref_layer, inputs, rank, reference):
    dx, grads = ep_gradients(layer, *inputs[rank])
    ref_dxs, ref_grads = reference
    report.close(f"{case}/dx", dx, ref_dxs[rank], GRAD_REL_TOL, "gradient")
    local = list(layer.local_expert_indices)  # the logical expert of each slot
    params = layer.trainable_params()
    report.equal(f"{case}/parameter_count", len(grads), len(ref_grads))
    expert_ids = {id(param) for param in layer.experts.trainable_params()}
    # Paths inside the layer (param.name changes as wrapping Cells rename the parameters).
    paths = {id(param): path for path, param in layer.parameters_and_names()}
    for param, grad, ref_grad in zip(params, grads, ref_grads):
        short = paths[id(param)]
        expected = ref_grad[local] if id(param) in expert_ids else ref_grad
        report.close(f"{case}/d_{short}", grad, expected, GRAD_REL_TOL, "gradient")
        report.check(f"{case}/d_{short}/nonzero", np.abs(expected).max() > 0, "zero reference")
    for repeat in range(REPEATS - 1):  # determinism: the same gradients, bit for bit
        again_dx, again_grads = ep_gradients(layer, *inputs[rank])
        report.equal(f"determinism/{case}/repeat{repeat}/dx", again_dx, dx)
        for index, (grad, first) in enumerate(zip(again_grads, grads)):
            report.equal(f"determinism/{case}/repeat{repeat}/param{index}", grad, first)


def check_phases_in_modes(report, case, layer, ref_layer, xs, rank, modes, **tolerance):
    """check_layer_forward of prefill and decode in each of ``modes`` (cases ``case/prefill``
    and ``case/decode``; the EP = 1 reference computed once per phase); ends in PYNATIVE_MODE.
    ``tolerance``: check_layer_forward's ``rel_tol`` and ``kind``."""
    references = {}
    for mode in modes:
        set_mode(report, mode)
        for phase in ("prefill", "decode"):
            def body(phase=phase, mode=mode):
                _, references[phase] = check_layer_forward(
                    report, f"{case}/{phase}", layer, ref_layer, xs, rank, phase, mode,
                    references.get(phase), **tolerance)
            report.run(f"{case}/{phase}", body)
    set_mode(report, "pynative")


def check_gradients_against_single_process(report, case, layer, ref_layer, inputs, rank):
    """check_gradients against the EP = 1 gradients of every source's loss (cases
    ``case/reference`` and ``case``): the reducer sums data-parallel replicas too."""
    reference = {}

    def reference_body():
        reference["value"] = reference_gradients(ref_layer, inputs)

    report.run(f"{case}/reference", reference_body)
    if "value" in reference:
        report.run(case, lambda: check_gradients(report, case, layer, ref_layer, inputs, rank,
                                                 reference["value"]))
