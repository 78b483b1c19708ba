"""msrun worker: the expert-parallel dispatchers driven directly, without a layer.

Parts (all by default; choose with ``--parts routing,combine_paths``):

- ``routing``: both dispatchers (``dispatch`` / ``combine``) on payload rows that encode (source
  rank, token, column); the grouped rows and counts are checked bitwise, then a fake expert
  (row * (global expert id + 1)) is applied and ``combine`` must return
  sum_k w[t, k] * (e_k + 1) * x[t] to the right token. The decode dispatcher's row-wise pair
  (``deliver`` / ``return_rows``) too: delivered rows, local ids, weights and counts bitwise,
  then the fake experts' partial sum per row must come back as the same sum. Many seeded
  random configurations, in PYNATIVE_MODE and (a subset) GRAPH_MODE.
- ``combine_paths``: the fused Combine and Return summing in the window and staged give
  bit-identical outputs, in float32 and bfloat16.

Usage: msrun ... ep_layer_routing_worker.py [--parts a,b]
"""
import os

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

import mindspore_moe_ep as mee

from ep_layer_common import COMBINE_REL_TOL, MASTER_SEED, graph_modes, load, run_parts, set_mode

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


PART_FUNCTIONS = {"routing": routing_part, "combine_paths": combine_paths_part}

if __name__ == "__main__":
    run_parts(PART_FUNCTIONS)
