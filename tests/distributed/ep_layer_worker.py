"""msrun worker: expert-parallel dispatchers and MoELayer against single-process results.

One launch runs every case for its world size W (msrun --worker_num=W), in PYNATIVE_MODE and,
for a representative subset, GRAPH_MODE. Each rank records one (case, ok, detail) entry per
check and a few measured values (max errors, counts, seconds), and writes its report with
launch.write_result; tests/test_expert_parallel.py reads the reports.

Inputs are deterministic functions of (seed, source rank), so every rank regenerates every
rank's inputs and computes what it must receive or return without any extra communication.

Parts (all by default; choose with ``--parts routing,layer,...``):

- ``routing``: both dispatchers driven directly (``dispatch`` / ``combine``) on payload rows that
  encode (source rank, token, column); the grouped rows and counts are checked bitwise, then a
  fake expert (row * (global expert id + 1)) is applied and ``combine`` must return
  sum_k w[t, k] * (e_k + 1) * x[t] to the right token. The decode dispatcher's row-wise pair
  (``deliver`` / ``return_rows``) too: delivered rows, local ids, weights and counts bitwise,
  then the fake experts' partial sum per row must come back as the same sum. Many seeded
  random configurations.
- ``layer``: MoELayer(EP = W) prefill and decode outputs and statistics against an EP = 1 layer
  (same weights: initialisation is keyed per global expert) on the concatenated batch; also
  both layers loaded from one Hugging Face-named checkpoint of the whole model (each EP rank
  loads only its own experts).
- ``grad``: gradients of L = sum over ranks of L_r = sum(y_r * G_r) (+ the router losses),
  after ExpertParallelGradReducer, against the sum over sources s of the EP = 1 gradients of L_s
  (each rank's router losses cover its own tokens, so the sum of the L_s, not the loss of the
  concatenated batch, is the single-process counterpart; with a capacity factor and no router
  losses, the EP = 1 gradient of the concatenated batch). Cases: switch aux + z loss,
  DeepSeek-V3 seq aux loss with expert bias, a rank without tokens, capacity factor.
- ``capacity``: capacity_factor under EP: output, per-expert counts and the group's dropped
  pairs against EP = 1 on the concatenated batch.
- determinism (inside ``layer`` and ``grad``): every forward and gradient is repeated and must
  be bitwise identical to the first run.
- ``bad``: bad inputs give a clear error on every rank within the exchange timeout.
- ``dp_ep`` (W = 4): expert_parallel 2, two data-parallel replicas.

Usage: msrun ... ep_layer_worker.py [--parts a,b,...]
"""
import argparse
import os
import time
import traceback

import numpy as np

import launch  # tests/distributed/launch.py, next to this script
from checks import CheckReport, timed_call  # tests/distributed/checks.py

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.communication import get_group_size, get_rank, init

import mindspore_moe_ep as mee
from mindspore_moe_ep.comm.window import world_all_gather

REPOSITORY_ROOT = launch.REPOSITORY_ROOT
TINY = os.path.join(REPOSITORY_ROOT, "yaml_configs", "tiny.yaml")
DEEPSEEK = os.path.join(REPOSITORY_ROOT, "yaml_configs", "deepseek_v3_small_4cpu.yaml")
PARTS = ("routing", "combine_paths", "layer", "grad", "capacity", "dp_ep", "bad")  # "bad" last: it breaks windows
MASTER_SEED = 20240611

# Tolerances (max |actual - expected| / max |expected|), float32 throughout.
COMBINE_REL_TOL = 2e-6   # per element, relative to sum_k |w (e + 1) x|: a few float32 roundings
LAYER_REL_TOL = 1e-5     # EP vs EP = 1 forward: the same arithmetic up to summation order
GRAD_REL_TOL = 5e-5      # EP vs EP = 1 gradients (sums over ranks in another order)
BAD_TIMEOUT_S = 3.0      # dispatch.timeout_s of the layers that are made to fail
REPEATS = 2              # extra runs of every layer forward / gradient, compared bitwise


def graph_modes(world, everywhere=False):
    """Modes of a case: GRAPH_MODE compiles cost 1-5 s each, and a world of 4 on 2 cores runs
    them about twice as slowly, so most graph-mode cases run only with 2 ranks."""
    return ("pynative", "graph") if everywhere or world <= 2 else ("pynative",)


# ---- reporting ---------------------------------------------------------------------------------

def error_message(body):
    """(message or None, seconds) of running body()."""
    _, message, seconds = timed_call(body)
    return message, seconds


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


# ---- part "routing": dispatchers driven directly ------------------------------------------------

# name, num_experts, top_k, hidden, max_tokens_per_rank, number of PYNATIVE configurations
# with 2 and with 4 ranks (4 ranks on 2 cores run about 3 times slower), configurations also
# run in GRAPH_MODE (one graph compile each: ~1 s), whether they do with 4 ranks too, and the
# window's slot bytes (None: the layer's default).
# "e16_k8_h64" has small slots: the fused Dispatch's messages of up to 6 rows travel through
# the slot, larger ones are read from the sender's memory (with single copy), in one step.
ROUTING_SPECS = (
    ("e8_k2", 8, 2, 8, 8, (18, 12), (1,), False, None),
    ("e16_k1", 16, 1, 8, 8, (16, 10), (0,), False, None),
    ("e16_k8", 16, 8, 8, 8, (16, 10), (2,), True, None),
    ("e8_k6_c5", 8, 6, 8, 5, (14, 10), (3,), True, None),
    ("e16_k8_h64", 16, 8, 64, 16, (8, 6), (0,), True, 2048),
)
PATTERNS = ("random", "one_expert", "one_rank", "skewed")


def payload(source, tokens, hidden):
    """[T, H] float32 rows encoding (source rank, token, column) exactly (integers < 2^24)."""
    token = np.arange(tokens, dtype=np.int64)[:, None]
    column = np.arange(hidden, dtype=np.int64)[None, :]
    return (source * 100000 + token * 64 + column).astype(np.float32)


def routing_case(spec_index, spec, index, world):
    """Token counts and routing of every source rank for one seeded configuration.

    Returns (tokens [W], pattern, per-source (x [T, H], expert_ids [T, K], weights [T, K])).
    Configurations 0-3 of every spec are the edge cases: all ranks full (T == C), the last rank
    with no tokens, rank 0 with one token, every rank with no tokens except rank 0.
    """
    _, experts, top_k, hidden, capacity = spec[:5]
    rng = np.random.default_rng([MASTER_SEED, spec_index, index, world])
    tokens = rng.integers(0, capacity + 1, size=world)
    if index == 0:
        tokens[:] = capacity
    elif index == 1:
        tokens[-1] = 0
    elif index == 2:
        tokens[0] = 1
    elif index == 3:
        tokens[:] = 0
        tokens[0] = capacity
    pattern = PATTERNS[index % len(PATTERNS)]
    hot_expert = int(rng.integers(experts))
    hot_rank = int(rng.integers(world))
    popularity = rng.dirichlet(np.full(experts, 0.3))
    local = experts // world
    sources = []
    for source in range(world):
        source_rng = np.random.default_rng([MASTER_SEED, spec_index, index, world, source])
        count = int(tokens[source])
        ids = np.zeros((count, top_k), np.int32)
        for t in range(count):
            if pattern == "random":
                choice = source_rng.permutation(experts)[:top_k]
            elif pattern == "one_expert":   # every token's first choice is the same expert
                rest = source_rng.permutation(np.delete(np.arange(experts), hot_expert))
                choice = np.concatenate([[hot_expert], rest[:top_k - 1]])
            elif pattern == "one_rank":     # as many choices as possible on one rank
                on_rank = hot_rank * local + source_rng.permutation(local)
                others = source_rng.permutation(np.setdiff1d(np.arange(experts), on_rank))
                choice = np.concatenate([on_rank, others])[:top_k]
            else:                           # skewed popularity
                choice = source_rng.choice(experts, top_k, replace=False, p=popularity)
            ids[t] = choice
        weights = source_rng.random((count, top_k)).astype(np.float32)
        sources.append((payload(source, count, hidden), ids, weights))
    return tokens, pattern, sources


def expected_grouping(sources, group_rank, local):
    """Rows rank `group_rank` must hold: (rows [n, H] float32, counts [L]), grouped by local
    expert, in (source rank, source token) order within an expert."""
    first = group_rank * local
    buckets = [[] for _ in range(local)]
    for x, ids, _ in sources:
        for t in range(ids.shape[0]):
            for expert in ids[t]:
                if first <= expert < first + local:
                    buckets[expert - first].append(x[t])
    hidden = sources[0][0].shape[1]
    rows = [row for bucket in buckets for row in bucket]
    rows = np.stack(rows) if rows else np.zeros((0, hidden), np.float32)
    return rows, np.array([len(bucket) for bucket in buckets], np.int32)


def fake_expert_scale(counts, first_expert, num_rows):
    """[num_rows] float32: (global expert id + 1) for each grouped row, 0 past the groups."""
    scale = np.zeros(num_rows, np.float32)
    used = int(counts.sum())
    scale[:used] = np.repeat(first_expert + np.arange(len(counts)) + 1, counts)
    return scale


class FakeExpertRoundTrip(nn.Cell):
    """dispatch -> rows * (global expert id + 1) -> combine, in one graph."""

    def __init__(self, dispatcher, first_expert, local_experts):
        super().__init__()
        self.dispatcher = dispatcher
        self.first_expert = first_expert
        self.local_experts = local_experts

    def construct(self, x, expert_ids, weights):
        rows, tokens_per_expert, num_dropped, handle = self.dispatcher.dispatch(
            x, expert_ids, weights)
        num_rows = rows.shape[0]
        ends = ops.cumsum(tokens_per_expert.astype(ms.float32), 0)                  # [L]
        row = ops.arange(num_rows).astype(ms.float32).reshape(num_rows, 1)
        group = (row >= ends.reshape(1, self.local_experts)).astype(ms.float32).sum(axis=1)
        in_group = (group < self.local_experts).astype(ms.float32)
        scale = (group + self.first_expert + 1) * in_group                           # [N]
        expert_out = rows * scale.reshape(num_rows, 1)
        y = self.dispatcher.combine(expert_out, handle)
        return rows, tokens_per_expert, num_dropped, y


def round_trip_eager(dispatcher, x, ids, weights, first_expert):
    rows, counts, dropped, handle = dispatcher.dispatch(Tensor(x), Tensor(ids), Tensor(weights))
    rows, counts = rows.asnumpy(), counts.asnumpy()
    scale = fake_expert_scale(counts, first_expert, rows.shape[0])
    expert_out = rows * scale[:, None]
    # Rows past the groups are unspecified: poison them, the combine must never read them.
    expert_out[int(counts.sum()):] = np.nan
    y = dispatcher.combine(Tensor(expert_out), handle).asnumpy()
    return rows, counts, int(dropped.asnumpy().sum()), y


class FakeExpertRowwiseRoundTrip(nn.Cell):
    """deliver -> rows * sum_k w[j, k] * (global expert id + 1) over local ids -> return_rows, in
    one graph (the row-wise contract: one partial sum per delivered row)."""

    def __init__(self, dispatcher, first_expert):
        super().__init__()
        self.dispatcher = dispatcher
        self.first_expert = first_expert

    def construct(self, x, expert_ids, weights):
        rows, local_ids, recv_weights, row_counts, route = self.dispatcher.deliver(
            x, expert_ids, weights)
        present = (local_ids >= 0).astype(ms.float32)                               # [N, K]
        scale = (recv_weights * (local_ids.astype(ms.float32) + self.first_expert + 1)
                 * present).sum(axis=1, keepdims=True)                               # [N, 1]
        y = self.dispatcher.return_rows(rows * scale, row_counts, route)
        return rows, local_ids, recv_weights, row_counts, y


def rowwise_fake_scale(local_ids, recv_weights, first_expert):
    """[N] float32: each delivered row's sum_k w[j, k] * (global expert id + 1) over its local
    ids (the fake experts of the row-wise round trips, in NumPy)."""
    present = local_ids >= 0
    return (recv_weights * (local_ids + first_expert + 1) * present).sum(axis=1)


def rowwise_round_trip_eager(dispatcher, x, ids, weights, first_expert):
    rows, local_ids, recv_weights, counts, route = (
        dispatcher.deliver(Tensor(x), Tensor(ids), Tensor(weights)))
    rows, local_ids, recv_weights, counts = (t.asnumpy() for t in (rows, local_ids,
                                                                    recv_weights, counts))
    scale = rowwise_fake_scale(local_ids, recv_weights, first_expert)
    partial = (rows * scale[:, None]).astype(np.float32)
    # Rows past each block's count are unspecified: poison them, the return must never read them.
    capacity = rows.shape[0] // len(counts)
    for block, count in enumerate(counts):
        partial[block * capacity + count:(block + 1) * capacity] = np.nan
    y = dispatcher.return_rows(Tensor(partial), Tensor(counts), route).asnumpy()
    return rows, local_ids, recv_weights, counts, y


def expected_delivery(sources, group_rank, local):
    """Per source: (token rows [n, H], local ids [n, K], weights [n, K]) that rank `group_rank`
    must receive, one row per token with an expert there, in token order."""
    first = group_rank * local
    blocks = []
    for x, ids, weights in sources:
        here = (ids >= first) & (ids < first + local)                               # [T, K]
        tokens = here.any(axis=1)
        blocks.append((x[tokens], np.where(here, ids - first, -1)[tokens].astype(np.int32),
                       np.where(here, weights, 0.0)[tokens].astype(np.float32)))
    return blocks


def check_expected_combine(report, case, y, sources, rank):
    """y must be sum_k w[t, k] * (e_k + 1) * x[t] for this rank's tokens (float64 reference)."""
    x, ids, weights = sources[rank]
    factors = weights.astype(np.float64) * (ids.astype(np.float64) + 1)             # [T, K]
    expected_y = factors.sum(axis=1, keepdims=True) * x.astype(np.float64)
    bound = np.abs(factors).sum(axis=1, keepdims=True) * np.abs(x.astype(np.float64))
    if y.shape != expected_y.shape:
        report.check(f"{case}/combine", False, f"shape {y.shape} != {expected_y.shape}")
        return
    error = np.abs(y - expected_y)
    relative = float((error / np.maximum(bound, 1e-30)).max(initial=0.0))
    report.values["max_error/routing_combine"] = max(
        report.values.get("max_error/routing_combine", 0.0), relative)
    report.check(f"{case}/combine", relative <= COMBINE_REL_TOL,
                 f"relative error {relative:.3g} > {COMBINE_REL_TOL:g}")


POISONED = os.environ.get("MOE_EP_POISON_UNUSED_ROWS") == "1"


def check_poisoned_tail(report, check, rows, first_unused, end):
    """Under MOE_EP_POISON_UNUSED_ROWS=1 the kernels fill the unspecified rows with NaN: shows
    that the poisoning, on which the tail tests rely, covers this buffer."""
    if POISONED and end > first_unused:
        report.check(check, bool(np.isnan(rows[first_unused:end]).all()),
                     f"rows {first_unused}..{end - 1} are not all NaN")


def check_rowwise_round_trip(report, case, result, sources, rank, world, local, capacity):
    rows, local_ids, recv_weights, counts, y = result
    hidden = sources[0][0].shape[1]
    report.check(f"{case}/row_buffer_shape", rows.shape == (world * capacity, hidden),
                 f"{rows.shape} != {(world * capacity, hidden)}")
    for block, count in enumerate(counts):
        check_poisoned_tail(report, f"{case}/tail_poisoned_block_{block}", rows,
                            block * capacity + count, (block + 1) * capacity)
    expected = expected_delivery(sources, rank, local)
    report.equal(f"{case}/row_counts", counts, [len(block[0]) for block in expected])
    for source, (expected_rows, expected_ids, expected_weights) in enumerate(expected):
        used = slice(source * capacity, source * capacity + len(expected_rows))
        report.equal(f"{case}/rows_from_{source}", rows[used], expected_rows)
        report.equal(f"{case}/local_ids_from_{source}", local_ids[used], expected_ids)
        report.equal(f"{case}/weights_from_{source}", recv_weights[used], expected_weights)
    check_expected_combine(report, case, y, sources, rank)


def check_round_trip(report, case, result, sources, rank, world, local, row_capacity):
    rows, counts, dropped, y = result
    expected_rows, expected_counts = expected_grouping(sources, rank, local)
    used = len(expected_rows)
    hidden = sources[0][0].shape[1]
    report.check(f"{case}/row_buffer_shape", rows.shape == (row_capacity, hidden),
                 f"{rows.shape} != {(row_capacity, hidden)}")
    report.equal(f"{case}/tokens_per_local_expert", counts, expected_counts)
    report.equal(f"{case}/rows", rows[:used], expected_rows)
    check_poisoned_tail(report, f"{case}/tail_poisoned", rows, used, row_capacity)
    report.check(f"{case}/no_drops", dropped == 0, f"num_dropped = {dropped}")
    check_expected_combine(report, case, y, sources, rank)


def routing_part(report, rank, world):
    layers = []
    for spec in ROUTING_SPECS:
        _, experts, top_k, hidden, capacity = spec[:5]
        slot_bytes = {"window_slot_bytes": spec[8]} if spec[8] is not None else {}
        config = load(expert_parallel=world, num_experts=experts, top_k=top_k,
                      hidden_size=hidden, max_tokens_per_rank=capacity, num_shared_experts=0,
                      **slot_bytes)
        layers.append(mee.MoELayer(config))
    configurations = []
    for mode in ("pynative", "graph"):
        set_mode(report, mode)
        for spec_index, (spec, layer) in enumerate(zip(ROUTING_SPECS, layers)):
            name, experts, top_k, _, capacity, pynative_cases, graph_cases, graph_at_4 = spec[:8]
            if mode not in graph_modes(world, graph_at_4):
                continue
            local = experts // world
            first_expert = rank * local
            row_capacity = {"prefill": world * capacity * top_k,
                            "decode": world * capacity * min(top_k, local)}
            # Each dispatcher's grouped pair (dispatch / combine) and row-wise pair (deliver /
            # return_rows: DeliverRows + the exchange, FusedDeliver / FusedReturn).
            dispatchers = {"prefill": layer.prefill_dispatcher,
                           "prefill_rowwise": layer.prefill_dispatcher,
                           "decode": layer.decode_dispatcher,
                           "decode_rowwise": layer.decode_dispatcher}
            cells = {phase: (FakeExpertRowwiseRoundTrip(dispatcher, first_expert)
                             if phase.endswith("_rowwise")
                             else FakeExpertRoundTrip(dispatcher, first_expert, local))
                     for phase, dispatcher in dispatchers.items()}
            indices = (range(pynative_cases[0 if world <= 2 else 1]) if mode == "pynative"
                       else graph_cases)
            for index in indices:
                tokens, pattern, sources = routing_case(spec_index, spec, index, world)
                configurations.append([mode, name, index, pattern, tokens.tolist()])
                x, ids, weights = sources[rank]
                for phase, dispatcher in dispatchers.items():
                    case = f"routing/{name}/{index}/{phase}"

                    def body(phase=phase, dispatcher=dispatcher, case=case):
                        if phase.endswith("_rowwise"):
                            result = (rowwise_round_trip_eager(dispatcher, x, ids, weights,
                                                               first_expert)
                                      if mode == "pynative" else tuple(
                                          out.asnumpy() for out in cells[phase](
                                              Tensor(x), Tensor(ids), Tensor(weights))))
                            check_rowwise_round_trip(report, case, result, sources, rank, world,
                                                     local, capacity)
                            return
                        if mode == "pynative":
                            result = round_trip_eager(dispatcher, x, ids, weights, first_expert)
                        else:
                            outputs = cells[phase](Tensor(x), Tensor(ids), Tensor(weights))
                            rows, counts, dropped, y = (out.asnumpy() for out in outputs)
                            result = rows, counts, int(dropped.sum()), y
                        check_round_trip(report, case, result, sources, rank, world, local,
                                         row_capacity[phase])

                    report.run(case, body)
    report.values["routing_configurations"] = configurations
    set_mode(report, "pynative")


# ---- part "combine_paths": the fused Combine in the window and staged ----------------------------

def fused_round_trip(layer, x, ids, weights, first_expert, dtype):
    """dispatch -> rows * (global expert id + 1) -> combine through the fused decode path, in
    `dtype`; returns y as float32."""
    dispatcher = layer.decode_dispatcher
    rows, counts, _, handle = dispatcher.dispatch(Tensor(x, dtype), Tensor(ids), Tensor(weights))
    scale = fake_expert_scale(counts.asnumpy(), first_expert, rows.shape[0])
    expert_out = rows * Tensor(scale[:, None], dtype)  # unspecified tail rows: never read
    return dispatcher.combine(expert_out, handle).astype(ms.float32).asnumpy()


def fused_rowwise_round_trip(layer, x, ids, weights, first_expert, dtype):
    """deliver -> rows * sum_k w (global expert id + 1) -> return_rows through the fused decode
    path's row-wise pair, in `dtype`; returns y as float32."""
    dispatcher = layer.decode_dispatcher
    rows, local_ids, recv_weights, counts, route = dispatcher.deliver(
        Tensor(x, dtype), Tensor(ids), Tensor(weights))
    scale = rowwise_fake_scale(local_ids.asnumpy(), recv_weights.asnumpy(), first_expert)
    partial = rows * Tensor(scale[:, None].astype(np.float32), dtype)  # tails: never read
    return dispatcher.return_rows(partial, counts, route).astype(ms.float32).asnumpy()


# Wide rows for the combine_paths part: 32 KiB float32 rows, so that a pulled Dispatch lands its
# rows in several batches (RowPull::delivered, ~256 KiB each) and copies each batch on.
WIDE_SPEC = ("e16_k8_h8192", 16, 8, 8192, 16, (3, 2))


def combine_paths_part(report, rank, world):
    """Routing cases of "e16_k8_h64" and of WIDE_SPEC through two layers: one whose window slots
    hold a peer's partial rows, so the fused Combine (and Return) writes them into the window
    and sums them where they lie (ShareRows), and one whose slots are too small, so it stages
    and exchanges them (the Return straight from its input). The outputs must be bit-identical
    and match the float64 expectation, in float32 and bfloat16 (x holds small integers, exact in
    bfloat16), for the grouped pair and the row-wise pair."""
    for spec_index, spec in ((len(ROUTING_SPECS) - 1, ROUTING_SPECS[-1]),
                             (len(ROUTING_SPECS), WIDE_SPEC)):
        name, experts, top_k, hidden, capacity = spec[:5]
        local = experts // world
        first_expert = rank * local
        for dtype_name, dtype, element, tolerance in (
                ("float32", ms.float32, 4, COMBINE_REL_TOL), ("bfloat16", ms.bfloat16, 2, 2e-2)):
            block_bytes = capacity * hidden * element  # one peer's partial rows
            layers = {}
            for path, slot in (("shared", {}),
                               ("staged", {"window_slot_bytes": block_bytes // 2})):
                layers[path] = mee.MoELayer(load(
                    expert_parallel=world, num_experts=experts, top_k=top_k,
                    hidden_size=hidden, max_tokens_per_rank=capacity, num_shared_experts=0,
                    dtype=dtype_name, **slot))
            slot_of = {path: layer.prefill_dispatcher.exchange.window.slot_bytes
                       for path, layer in layers.items()}
            prefix = f"combine_paths/{name}/{dtype_name}"
            report.check(f"{prefix}/slots", slot_of["staged"] < block_bytes <= slot_of["shared"],
                         f"slots {slot_of} for {block_bytes}-byte blocks")
            for index in range(spec[5][0 if world <= 2 else 1]):
                _, _, sources = routing_case(spec_index, spec, index, world)
                x, ids, weights = sources[rank]
                x = (x % 128).astype(np.float32)
                factors = weights.astype(np.float64) * (ids.astype(np.float64) + 1)  # [T, K]
                expected = factors.sum(axis=1, keepdims=True) * x.astype(np.float64)
                bound = np.abs(factors).sum(axis=1, keepdims=True) * np.abs(x) + 1e-30
                for pair, round_trip in (("", fused_round_trip),
                                         ("rowwise/", fused_rowwise_round_trip)):
                    y = {path: round_trip(layer, x, ids, weights, first_expert, dtype)
                         for path, layer in layers.items()}
                    report.equal(f"{prefix}/{index}/{pair}in_window_equals_staged",
                                 y["shared"], y["staged"])
                    relative = float((np.abs(y["shared"] - expected) / bound).max(initial=0.0))
                    report.check(f"{prefix}/{index}/{pair}vs_expected", relative <= tolerance,
                                 f"relative error {relative:.3g} > {tolerance:g}")
            del layers


# ---- helpers for whole-layer parts ---------------------------------------------------------------

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


def group_of(rank, ep_size):
    first = rank // ep_size * ep_size
    return list(range(first, first + ep_size))


def check_layer_forward(report, case, layer, ref_layer, xs, rank, phase, mode, reference=None):
    """EP output and statistics vs EP = 1 on the concatenated batch of this rank's group.

    Returns the EP output. ``reference`` caches (outputs, stats) of the EP = 1 layer, computed
    once in PYNATIVE_MODE.
    """
    group = layer.group
    members = list(group.group_ranks)
    if reference is None:
        reference = reference_forward(ref_layer, xs, members, phase)
    expected, ref_stats = reference
    x = Tensor(xs[rank])
    y = numpy_of(forward_cell(layer, phase)(x) if mode == "graph" else layer(x, phase))
    report.close(f"{case}/output", y, expected[rank], LAYER_REL_TOL, "layer_output")
    stats = layer.stats()
    local = slice(group.group_rank * group.experts_per_rank,
                  (group.group_rank + 1) * group.experts_per_rank)
    report.equal(f"{case}/tokens_per_expert", stats["tokens_per_expert"],
                 ref_stats["tokens_per_expert"][local])
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


def tiny_layer_config(world, **overrides):
    settings = dict(expert_parallel=world, max_tokens_per_rank=32, decode_token_threshold=32)
    settings.update(overrides)
    return load(TINY, **settings)


def deepseek_layer_config(world, **overrides):
    settings = dict(expert_parallel=world, hidden_size=64, expert_ffn_size=32,
                    max_tokens_per_rank=32, decode_token_threshold=32)
    settings.update(overrides)
    return load(DEEPSEEK, **settings)


# Token shapes per source rank (indexed by rank; uneven on purpose: a rank with no tokens, one
# with max_tokens_per_rank = 32, one with a single token).
TINY_SHAPES = [(13,), (0,), (32,), (1,)]
DEEPSEEK_SHAPES = [(2, 5), (1, 3), (3, 4), (1, 1)]


def layer_part(report, rank, world):
    cases = [  # name, config, token shapes per source, hidden, input seed, set expert bias,
               # modes
        ("tiny", tiny_layer_config(world), TINY_SHAPES, 16, 1, False, graph_modes(world)),
        ("deepseek", deepseek_layer_config(world), DEEPSEEK_SHAPES, 64, 2, True,
         graph_modes(world, everywhere=True)),
        # Prefill inference runs the fused experts + combine in rounds of 5 rows per source (up
        # to 7 rounds); the other cases, whose rounds would hold as much as the unfused partial
        # sums (max_tokens_per_rank = 32 < combine_round_tokens), run the unfused steps. Its
        # decode takes the grouped fused operators, the others' the row-wise ones.
        ("tiny_rounds",
         tiny_layer_config(world, combine_round_tokens=5, decode_layout="grouped"),
         TINY_SHAPES, 16, 4, False, graph_modes(world)),
    ]
    for name, config, shapes, hidden, seed, bias, modes in cases:
        layer = mee.MoELayer(config)
        ref_layer = mee.MoELayer(single_process(config))
        layer.set_train(False)
        ref_layer.set_train(False)
        fused = name == "tiny_rounds"
        report.equal(f"layer/{name}/prefill_path", layer.experts_path(8, "prefill"),
                     "experts_combine" if fused else "rowwise")
        report.equal(f"layer/{name}/decode_path", layer.experts_path(8, "decode"),
                     "grouped" if fused else "rowwise")
        report.values["window_transport"] = layer.prefill_dispatcher.exchange.window.transport
        if fused:
            report.equal(f"layer/{name}/combine_round_rows", int(
                layer.prefill_dispatcher.experts_combine_kernel._round_rows.asnumpy()[0]), 5)
        if bias:
            set_expert_bias([layer, ref_layer], 7, config.model.num_experts)
        xs = [x for x, _ in layer_inputs(seed, shapes[:world], hidden)]
        references = {}
        for mode in modes:
            set_mode(report, mode)
            for phase in ("prefill", "decode"):
                def body(phase=phase):
                    _, references[phase] = check_layer_forward(
                        report, f"layer/{name}/{phase}", layer, ref_layer, xs, rank, phase, mode,
                        references.get(phase))
                report.run(f"layer/{name}/{phase}", body)
        set_mode(report, "pynative")
        report.check(f"layer/{name}/decode_path_is_fused",
                     type(layer.decode_dispatcher).__name__ == "FusedDecodeDispatcher",
                     type(layer.decode_dispatcher).__name__)
    set_mode(report, "pynative")
    report.run("layer/hf_checkpoint", lambda: checkpoint_part(report, rank, world))


def random_checkpoint(full_layer, seed):
    """A Hugging Face-named state dict of the whole model (every expert), random values."""
    from mindspore_moe_ep.state_dict import _expected_shapes  # the keys an EP = 1 layer loads
    rng = np.random.default_rng([MASTER_SEED, seed])
    return {key: (rng.standard_normal(shape) * 0.2).astype(np.float32)
            for key, shape in _expected_shapes(full_layer).items()}


def checkpoint_part(report, rank, world):
    """Both layers load one checkpoint: EP output must equal EP = 1 (the right experts loaded)."""
    config = deepseek_layer_config(world)
    layer = mee.MoELayer(config)
    ref_layer = mee.MoELayer(single_process(config))
    checkpoint = random_checkpoint(ref_layer, seed=11)
    for each in (layer, ref_layer):
        each.load_hf_state_dict(checkpoint)
        each.set_train(False)
    report.check("layer/hf_checkpoint/loaded_experts",
                 len(layer.local_expert_indices) == config.model.num_experts // world,
                 f"local experts {list(layer.local_expert_indices)}")
    xs = [x for x, _ in layer_inputs(3, DEEPSEEK_SHAPES[:world], 64)]
    for phase in ("prefill", "decode"):
        case = f"layer/hf_checkpoint/{phase}"
        report.run(case, lambda case=case, phase=phase: check_layer_forward(
            report, case, layer, ref_layer, xs, rank, phase, "pynative"))


# ---- part "grad" -------------------------------------------------------------------------------

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
    group = layer.group
    dx, grads = ep_gradients(layer, *inputs[rank])
    ref_dxs, ref_grads = reference
    report.close(f"{case}/dx", dx, ref_dxs[rank], GRAD_REL_TOL, "gradient")
    local = slice(group.group_rank * group.experts_per_rank,
                  (group.group_rank + 1) * group.experts_per_rank)
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


def grad_part(report, rank, world):
    # Each case takes one of the experts' paths (see layer.py): "grouped" (training), "eval"
    # (not training: the fused experts + combine under EP, ExpertsWeightedSum in the reference;
    # the gradients of both recompute the experts) or "recompute" (training with
    # runtime.recompute_experts: ExpertsWeightedSum in both).
    cases = [  # name, config, token shapes per source, hidden, seed, expert bias, modes,
               # concatenated reference, experts' path
        ("tiny_switch_aux_z",
         tiny_layer_config(world, aux_loss_type="switch", aux_loss_coeff=0.01, z_loss_coeff=0.001),
         [(12,), (7,), (3,), (10,)], 16, 1001, False, graph_modes(world), False, "grouped"),
        ("tiny_switch_aux_z_recompute",
         tiny_layer_config(world, aux_loss_type="switch", aux_loss_coeff=0.01, z_loss_coeff=0.001,
                           recompute_experts=True),
         [(12,), (7,), (3,), (10,)], 16, 1001, False, graph_modes(world), False, "recompute"),
        ("deepseek_seq_aux", deepseek_layer_config(world, combine_round_tokens=4),
         [(2, 4), (1, 4), (3, 4), (1, 4)],
         64, 1002, True, ("pynative",), False, "eval"),
        ("tiny_zero_tokens_no_aux", tiny_layer_config(world, recompute_experts=True),
         [(9,), (0,), (5,), (1,)], 16, 1003, False, ("pynative",), False, "recompute"),
        ("tiny_capacity", tiny_layer_config(world, capacity_factor=1.0),
         [(12,), (5,), (9,), (2,)], 16, 1004, False, ("pynative",), True, "grouped"),
    ]
    for name, config, shapes, hidden, seed, bias, modes, concatenate, path in cases:
        layer = mee.MoELayer(config)
        ref_layer = mee.MoELayer(single_process(config))
        expected_paths = {"grouped": ("grouped", "grouped"), "recompute": ("rowwise", "rowwise"),
                          "eval": ("experts_combine", "rowwise")}[path]
        for each, expected in zip((layer, ref_layer), expected_paths):
            each.set_train(path != "eval")
            report.equal(f"grad/{name}/path", each._dispatcher_for(4, "prefill")[1], expected)
        if bias:
            set_expert_bias([layer, ref_layer], 11, config.model.num_experts)
        inputs = layer_inputs(seed, shapes[:world], hidden)
        reference = {}

        def reference_body():
            reference["value"] = reference_gradients(ref_layer, inputs, concatenate)

        set_mode(report, "pynative")
        report.run(f"grad/{name}/reference", reference_body)
        for mode in modes:
            set_mode(report, mode)
            report.run(f"grad/{name}", lambda: check_gradients(
                report, f"grad/{name}", layer, ref_layer, inputs, rank, reference["value"]))
    set_mode(report, "pynative")


# ---- part "capacity" ---------------------------------------------------------------------------

def capacity_part(report, rank, world):
    cases = [  # capacity_factor, token shapes per rank, modes
        (1.0, [(16,)] * 4, graph_modes(world)),
        (0.5, [(16,)] * 4, ("pynative",)),
        (1.5, [(9,)] * 4, ("pynative",)),
        (1.0, [(16,), (4,), (9,), (1,)], ("pynative",)),  # uneven: capacity of the group batch
    ]
    for factor, shapes, modes in cases:
        name = f"capacity/{factor}/{shapes[1][0]}"
        config = tiny_layer_config(world, capacity_factor=factor)
        layer = mee.MoELayer(config)
        ref_layer = mee.MoELayer(single_process(config))
        report.check(f"{name}/no_fused_decode", layer.decode_dispatcher is None,
                     "the fused decode path never drops: capacity must use the prefill path")
        xs = [x for x, _ in layer_inputs(int(factor * 100), shapes[:world], 16)]
        reference = {}
        for mode in modes:
            set_mode(report, mode)

            def body():
                _, reference["value"] = check_layer_forward(
                    report, name, layer, ref_layer, xs, rank, "prefill", mode,
                    reference.get("value"))
                report.values[f"{name}/ref_num_dropped"] = reference["value"][1]["num_dropped"]
            report.run(name, body)
    set_mode(report, "pynative")


# ---- part "bad" --------------------------------------------------------------------------------

def bad_input_part(report, rank, world):
    """Every case records each rank's error message and how long it took to arrive."""
    messages = {}
    last = world - 1

    def record(name, body):
        messages[name] = error_message(body)

    # Ranks loading different configs: every rank fails while building the layer.
    record("config_differs", lambda: mee.MoELayer(
        tiny_layer_config(world, top_k=3 if rank == 1 else 2)))

    # More tokens than dispatch.max_tokens_per_rank on every rank: a ValueError before any
    # exchange (the window's next step is failed for the peers); a rebuilt layer works.
    too_many = Tensor(np.ones((9, 16), np.float32))
    for phase in ("prefill", "decode"):
        layer = mee.MoELayer(tiny_layer_config(world, max_tokens_per_rank=8,
                                               timeout_s=BAD_TIMEOUT_S))
        record(f"too_many_tokens_all/{phase}", lambda phase=phase: layer(too_many, phase))
        layer.close()
    layer = mee.MoELayer(tiny_layer_config(world, max_tokens_per_rank=8, timeout_s=BAD_TIMEOUT_S))
    fits = Tensor(np.ones((8, 16), np.float32))
    record("usable_after_rebuild", lambda: layer(fits, "prefill").asnumpy())

    # Only the last rank has too many tokens: it fails at once, and so do the others, with its
    # reason (the refused input fails the window's next step).
    layer = mee.MoELayer(tiny_layer_config(world, max_tokens_per_rank=8, timeout_s=BAD_TIMEOUT_S))
    tokens = 9 if rank == last else 4
    record("too_many_tokens_one_rank",
           lambda: layer(Tensor(np.ones((tokens, 16), np.float32)), "prefill").asnumpy())

    # An expert id out of range on rank 1 only, through each dispatcher directly. The rows are
    # read before combine is queued, so that the error explained is the dispatch's own; the
    # "unsynced" case queues both (as inside a layer): PyNative then runs combine on the
    # failed dispatch's outputs, and its failure may replace the explanation.
    for phase, synced in (("prefill", True), ("decode", True), ("decode_rowwise", True),
                          ("decode_unsynced", False)):
        layer = mee.MoELayer(tiny_layer_config(world, max_tokens_per_rank=8,
                                               timeout_s=BAD_TIMEOUT_S))
        dispatcher = (layer.prefill_dispatcher if phase == "prefill"
                      else layer.decode_dispatcher)
        ids = np.array([[0, 5], [3, 1], [7, 2]], np.int32)
        if rank == 1:
            ids[1, 1] = 99

        def bad_dispatch(dispatcher=dispatcher, ids=ids, synced=synced,
                         rowwise=phase == "decode_rowwise"):
            inputs = (Tensor(np.ones((3, 16), np.float32)), Tensor(ids),
                      Tensor(np.full((3, 2), 0.5, np.float32)))
            if rowwise:
                rows, _, _, row_counts, route = dispatcher.deliver(*inputs)
                rows.asnumpy()
                dispatcher.return_rows(rows, row_counts, route).asnumpy()
                return
            rows, _, _, handle = dispatcher.dispatch(*inputs)
            if synced:
                rows.asnumpy()
            dispatcher.combine(rows, handle).asnumpy()

        record(f"bad_expert_id/{phase}", bad_dispatch)
    report.values["bad_messages"] = messages


# ---- part "dp_ep" (world 4: two replicas of a 2-way expert-parallel group) ----------------------

def dp_ep_part(report, rank, world):
    if world % 2 or world < 4:
        return
    config = tiny_layer_config(2, aux_loss_type="switch", aux_loss_coeff=0.01)
    layer = mee.MoELayer(config)
    ref_layer = mee.MoELayer(single_process(config))
    layer.set_train(False)
    ref_layer.set_train(False)
    report.equal("dp_ep/group_ranks", list(layer.group.group_ranks), group_of(rank, 2))
    shapes = [(12,), (5,), (9,), (1,)]
    inputs = layer_inputs(4242, shapes, 16)
    xs = [x for x, _ in inputs]
    references = {}
    for mode in ("pynative", "graph"):
        set_mode(report, mode)
        for phase in ("prefill", "decode"):
            def body(phase=phase):
                _, references[phase] = check_layer_forward(
                    report, f"dp_ep/{phase}", layer, ref_layer, xs, rank, phase, mode,
                    references.get(phase))
            report.run(f"dp_ep/{phase}", body)
    set_mode(report, "pynative")
    reference = {}

    def reference_body():
        reference["value"] = reference_gradients(ref_layer, inputs)  # over the whole world

    report.run("dp_ep/grad/reference", reference_body)
    report.run("dp_ep/grad", lambda: check_gradients(
        report, "dp_ep/grad", layer, ref_layer, inputs, rank, reference["value"]))


# ---- main --------------------------------------------------------------------------------------

PART_FUNCTIONS = {"routing": routing_part, "combine_paths": combine_paths_part,
                  "layer": layer_part, "grad": grad_part,
                  "capacity": capacity_part,
                  "bad": bad_input_part, "dp_ep": dp_ep_part}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default=",".join(PARTS))
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
            PART_FUNCTIONS[part](report, rank, world)
        except Exception:  # a part that fails outside its cases is a failed check too
            report.check(f"{part}/part", False, traceback.format_exc()[-2000:])
        report.values[f"part_seconds/{part}"] = round(time.monotonic() - part_started, 2)
    report.values["total_s"] = round(time.monotonic() - started, 2)
    launch.write_result({"rank": rank, "world": world, "parts": parts, "checks": report.checks,
                         **report.values})


if __name__ == "__main__":
    main()
