#!/usr/bin/env python
"""End to end: the MoE layer as a user runs it, at EP 4, against fairscale and a dropless
index-based PyTorch EP layer, in training, prefill and decode, at every size.

    python scripts/benchmarks/end_to_end.py [--quick] [--out DIR]

All sides: 4 local worker processes (expert parallelism 4), a Mixtral-style layer of E = 16
SwiGLU experts ``down(silu(x W_gate) * (x W_up))`` (hidden H = 1024, width F = 512, 4 per rank),
top-2 softmax gate, no shared expert, float32, T tokens per rank.

- ``mindspore_moe_ep`` exactly as a user writes it (README): ``MoELayer(config_from_hf({...
  Mixtral...}, expert_parallel=4))`` under msrun, GRAPH_MODE, nothing else set: the default
  ``max_tokens_per_rank`` (4,096) whatever the step's size, the library's own host defaults, no
  environment variables. Training: ``mindspore.value_and_grad`` of ``layer(x,
  phase="prefill").sum()`` with respect to the input and the weights (sparse all-to-all-v over
  the shared-memory window, dropless); prefill inference ``layer(x, phase="prefill")``; decode
  ``layer(x, phase="decode")`` (the fused decode operators).
- ``PyTorch index-based EP`` (written here, Megatron-Core's all-to-all token dispatcher pattern):
  top-2 softmax gate, sort the (token, expert) pairs by expert, counts with
  ``all_to_all_single``, rows with ``all_to_all_single`` and split sizes over gloo, one SwiGLU
  per local expert on its contiguous rows, the reverse exchange, weighted sum per token;
  dropless. Autograd for training.
- ``fairscale``: ``fairscale.nn.MOELayer`` with its ``Top2Gate`` (GShard: capacity 2 * T / E per
  expert, tokens beyond it dropped; einsum dispatch; ``all_to_all_single`` over gloo); training
  only (it has no decode path).

PyTorch runs 1 thread per process (4 processes on the machine's cores); ours uses its default
(kernel threads = usable cores / ranks on the host, at least 1). A step's time is the slowest
rank's best repetition, each repetition started after a barrier. The compute bound of a step is
its expert FLOPs (6 H F per (token, expert) pair forward, 3x that for forward + backward) over
the float32 GEMM rate each rank measures in the same run, all 4 ranks at once, on the experts'
own GEMM shape (T * top_k / 4 rows per local expert, through the layer's grouped GEMM kernel);
``of bound`` = step time / compute bound.

Targets (issue 17): training >= 2x fairscale and >= 1.2x the PyTorch EP layer at every
T >= 512, a step within 1.3x of its compute bound; inference >= 1.5x the PyTorch EP layer at
every size, >= 3x in decode.
"""
import os
import sys
import time

import numpy as np

import bench_common as bc

NAME = "end_to_end"
WORLD, EXPERTS, TOP_K, HIDDEN, FFN = 4, 16, 2, 1024, 512
HF_CONFIG = {"model_type": "mixtral", "hidden_size": HIDDEN, "intermediate_size": FFN,
             "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K}
TARGETS = {"train_vs_fairscale": 2.0, "train_vs_torch_ep": 1.2, "train_of_bound": 1.3,
           "prefill_vs_torch_ep": 1.5, "decode_vs_torch_ep": 3.0}


def sizes(quick):
    """{"train": [T...], "prefill": [T...], "decode": [T...]} tokens per rank, and repeats."""
    if quick:
        return {"train": [512, 2048], "prefill": [512, 2048], "decode": [1, 128]}, 3
    return {"train": [256, 512, 1024, 2048, 4096], "prefill": [512, 1024, 2048, 4096],
            "decode": [1, 8, 32, 128]}, 5


def expert_flops(tokens, phase):
    """FLOPs of one rank's routed experts in a step (balanced routing: T * K pairs per rank)."""
    forward = 6 * HIDDEN * FFN * tokens * TOP_K
    return 3 * forward if phase == "train" else forward


def time_step(step, repeats, barrier):
    """A first (compiling) call, then ``repeats`` calls each after a barrier: best and median."""
    step()
    samples = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return {"min_s": min(samples), "median_s": float(np.median(samples))}


def inputs(rank, tokens):
    return np.random.default_rng(1000 * rank + tokens).standard_normal(
        (tokens, HIDDEN), dtype=np.float32)


# ---- mindspore_moe_ep, as a user writes it ---------------------------------------------------

def ms_worker(quick):
    import mindspore as ms
    from mindspore import Tensor
    from mindspore.communication import get_rank, init

    import mindspore_moe_ep as mee

    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    layer = mee.MoELayer(mee.config_from_hf(HF_CONFIG, expert_parallel=WORLD))
    # --- the user's script ends here; what follows is measurement ---
    from mindspore_moe_ep.ops import GroupedMatmul

    barrier = bc.world_barrier

    rank = get_rank()
    plan, repeats = sizes(quick)

    def loss(x):
        return layer(x, phase="prefill").sum()
    gradient = ms.value_and_grad(loss, 0, layer.trainable_params())
    timings = {"train": {}, "prefill": {}, "decode": {}, "gemm_gflops": {}}
    layer.set_train(True)
    for tokens in plan["train"]:
        x = Tensor(inputs(rank, tokens))

        def train_step():
            _, (dx, _) = gradient(x)
            dx.asnumpy()
        timings["train"][tokens] = time_step(train_step, repeats, barrier)
    layer.set_train(False)
    for phase in ("prefill", "decode"):
        for tokens in plan[phase]:
            x = Tensor(inputs(rank, tokens))
            timings[phase][tokens] = time_step(lambda: layer(x, phase=phase).asnumpy(),
                                               repeats, barrier)
    # The experts' GEMM rate on these cores, all ranks at once: the gate_up GEMM of a balanced
    # step (T * K / L rows per local expert), through the grouped GEMM kernel the layer uses.
    matmul = GroupedMatmul()
    local = EXPERTS // WORLD
    weights = Tensor(np.random.default_rng(rank).standard_normal(
        (local, HIDDEN, 2 * FFN), dtype=np.float32))
    for tokens in sorted(set(plan["train"] + plan["prefill"])):
        rows = tokens * TOP_K
        x = Tensor(np.random.default_rng(rank).standard_normal((rows, HIDDEN),
                                                               dtype=np.float32))
        counts = Tensor(np.full(local, rows // local, np.int32))
        seconds = time_step(lambda: matmul(x, weights, counts).asnumpy(), repeats, barrier)
        timings["gemm_gflops"][tokens] = 2 * rows * HIDDEN * 2 * FFN / seconds["min_s"] / 1e9
    layer.close()
    bc.write_worker_result({"rank": rank, **timings,
                            "host_defaults": mee.applied_host_defaults()})


# ---- PyTorch peers ---------------------------------------------------------------------------

def torch_swiglu_experts(torch, count):
    class SwiGLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = torch.nn.Linear(HIDDEN, 2 * FFN, bias=False)
            self.down = torch.nn.Linear(FFN, HIDDEN, bias=False)

        def forward(self, x):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(torch.nn.functional.silu(gate) * up)

    return torch.nn.ModuleList([SwiGLU() for _ in range(count)])


def index_based_ep_layer(torch, dist, world):
    """Megatron-Core's all-to-all dispatcher pattern, dropless, over gloo."""

    class AllToAll(torch.autograd.Function):
        """Rows with split sizes; the gradient is the reverse exchange."""

        @staticmethod
        def forward(ctx, rows, send_splits, recv_splits):
            ctx.splits = (send_splits, recv_splits)
            out = rows.new_empty((sum(recv_splits), rows.shape[1]))
            dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits)
            return out

        @staticmethod
        def backward(ctx, grad):
            send_splits, recv_splits = ctx.splits
            out = grad.new_empty((sum(send_splits), grad.shape[1]))
            dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits)
            return out, None, None

    local = EXPERTS // world

    class IndexBasedEP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(HIDDEN, EXPERTS, bias=False)
            self.experts = torch_swiglu_experts(torch, local)

        def forward(self, x):                                                   # [T, H]
            probs = torch.softmax(self.gate(x), dim=-1)
            weights, ids = probs.topk(TOP_K, dim=-1)                            # [T, K]
            weights = weights / weights.sum(-1, keepdim=True)
            flat_ids = ids.reshape(-1)                                          # [T*K]
            order = torch.argsort(flat_ids, stable=True)
            rows = x[order // TOP_K]                                            # [T*K, H]
            per_expert = torch.bincount(flat_ids, minlength=EXPERTS)            # [E]
            received_per_expert = torch.empty_like(per_expert)
            dist.all_to_all_single(received_per_expert, per_expert)            # [R*L]
            send_splits = per_expert.view(world, local).sum(1).tolist()
            recv_counts = received_per_expert.view(world, local)                # [R, L]
            recv_splits = recv_counts.sum(1).tolist()
            received = AllToAll.apply(rows, send_splits, recv_splits)           # [N, H]
            # rows arrive grouped by source rank, then expert: regroup by local expert
            source_expert = torch.arange(local).repeat(world)
            by_expert = torch.argsort(source_expert.repeat_interleave(recv_counts.reshape(-1)),
                                      stable=True)
            grouped = received[by_expert]
            per_local = recv_counts.sum(0).tolist()
            outputs = torch.cat([expert(chunk) for expert, chunk in
                                 zip(self.experts, grouped.split(per_local))])
            restored = torch.empty_like(outputs).index_copy(0, by_expert, outputs)
            returned = AllToAll.apply(restored, recv_splits, send_splits)       # [T*K, H]
            pair_out = torch.empty_like(returned).index_copy(0, order, returned)
            return (pair_out.view(-1, TOP_K, HIDDEN) * weights.unsqueeze(-1)).sum(1)

    return IndexBasedEP()


def torch_worker(quick):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    plan, repeats = sizes(quick)
    timings = {"torch_ep": {"train": {}, "prefill": {}, "decode": {}},
               "fairscale": {"train": {}}}
    ep = index_based_ep_layer(torch, dist, world)
    try:
        from fairscale.nn import MOELayer, Top2Gate
        fairscale = MOELayer(Top2Gate(HIDDEN, EXPERTS), torch_swiglu_experts(torch,
                                                                             EXPERTS // world))
    except ImportError:
        fairscale = timings["fairscale"] = None
    for tokens in plan["train"]:
        x = torch.from_numpy(inputs(rank, tokens)).requires_grad_(True)

        def train(module, shaped):
            def step():
                module.zero_grad(set_to_none=True)
                x.grad = None
                module(shaped()).sum().backward()
            return step
        timings["torch_ep"]["train"][tokens] = time_step(train(ep, lambda: x), repeats,
                                                         dist.barrier)
        if fairscale is not None:  # fairscale wants [groups, tokens, H], groups | local experts
            local = EXPERTS // world
            timings["fairscale"]["train"][tokens] = time_step(
                train(fairscale, lambda: x.view(local, tokens // local, HIDDEN)), repeats,
                dist.barrier)
    with torch.no_grad():
        for phase in ("prefill", "decode"):
            for tokens in plan[phase]:
                x = torch.from_numpy(inputs(rank, tokens))
                timings["torch_ep"][phase][tokens] = time_step(lambda: ep(x), repeats,
                                                               dist.barrier)
    dist.destroy_process_group()
    bc.write_worker_result({"rank": rank, **timings})


# ---- the comparison --------------------------------------------------------------------------

def slowest_best(reports, *keys):
    """Per T: the slowest rank's best time (s) of reports[...][keys]."""
    def lookup(report):
        for key in keys:
            report = report[key]
        return report
    return {int(tokens): max(lookup(r)[tokens]["min_s"] for r in reports)
            for tokens in lookup(reports[0])}


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    args = parser.parse_args(argv)
    if args.role == "ms":
        return ms_worker(args.quick)
    if args.role == "torch":
        return torch_worker(args.quick)

    plan, repeats = sizes(args.quick)
    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    print(f"[{NAME}] EP {WORLD}, {EXPERTS} experts, top-{TOP_K}, H={HIDDEN}, F={FFN}, float32; "
          f"train T={plan['train']}, prefill T={plan['prefill']}, decode T={plan['decode']}",
          flush=True)
    script = os.path.abspath(__file__)
    extra = ["--quick"] if args.quick else []
    progress = bc.Progress(NAME, 2)
    ours = bc.launch_msrun(script, WORLD, ["--role", "ms", *extra], timeout_s=3600)
    progress.step("mindspore_moe_ep MoELayer (as a user runs it)")
    try:
        import torch  # noqa: F401
        peers = bc.launch_processes(script, WORLD, ["--role", "torch", *extra],
                                    timeout_s=3600)
    except ImportError:
        peers = None
        print(f"[{NAME}] torch is not installed: the peer comparison is skipped", flush=True)
    progress.step("PyTorch peers")

    results = {"ours": {phase: slowest_best(ours, phase) for phase in
                        ("train", "prefill", "decode")},
               "gemm_gflops_per_rank": {int(t): min(r["gemm_gflops"][t] for r in ours)
                                        for t in ours[0]["gemm_gflops"]}}
    if peers:
        results["torch_ep"] = {phase: slowest_best(peers, "torch_ep", phase)
                               for phase in ("train", "prefill", "decode")}
        if peers[0]["fairscale"] is not None:
            results["fairscale"] = {"train": slowest_best(peers, "fairscale", "train")}

    def ratio(peer, phase, tokens):
        try:
            return results[peer][phase][tokens] / results["ours"][phase][tokens]
        except KeyError:
            return float("nan")

    rows, checks = [], []
    for phase in ("train", "prefill", "decode"):
        for tokens in plan[phase]:
            ours_s = results["ours"][phase][tokens]
            rate = results["gemm_gflops_per_rank"].get(tokens)
            bound_s = expert_flops(tokens, phase) / (rate * 1e9) if rate else float("nan")
            row = {"phase": phase, "tokens_per_rank": tokens, "ours_ms": ours_s * 1e3,
                   "torch_ep_ms": results.get("torch_ep", {}).get(phase, {}).get(tokens,
                                                                                 float("nan"))
                   * 1e3,
                   "fairscale_ms": results.get("fairscale", {}).get(phase, {}).get(
                       tokens, float("nan")) * 1e3,
                   "vs_torch_ep": ratio("torch_ep", phase, tokens),
                   "vs_fairscale": ratio("fairscale", phase, tokens),
                   "compute_bound_ms": bound_s * 1e3, "of_bound": ours_s / bound_s}
            rows.append(row)
            if phase == "train" and tokens >= 512:
                checks += [("train_vs_fairscale", tokens, row["vs_fairscale"], ">="),
                           ("train_vs_torch_ep", tokens, row["vs_torch_ep"], ">="),
                           ("train_of_bound", tokens, row["of_bound"], "<=")]
            elif phase != "train":
                checks.append((f"{phase}_vs_torch_ep", tokens, row["vs_torch_ep"], ">="))
    print(bc.table(["phase", "T/rank", "ours ms", "PyTorch EP ms", "fairscale ms",
                    "x PyTorch EP", "x fairscale", "bound ms", "of bound"],
                   [[r["phase"], r["tokens_per_rank"], r["ours_ms"], r["torch_ep_ms"],
                     r["fairscale_ms"], r["vs_torch_ep"], r["vs_fairscale"],
                     r["compute_bound_ms"], r["of_bound"]] for r in rows]))
    verdicts = []
    for target, tokens, value, sense in checks:
        goal = TARGETS[target]
        met = bool(value >= goal) if sense == ">=" else bool(value <= goal)
        verdicts.append({"target": target, "tokens_per_rank": tokens, "value": value,
                         "goal": f"{sense} {goal}", "met": met})
    missed = [v for v in verdicts if not v["met"]]
    print(f"[{NAME}] targets met: {len(verdicts) - len(missed)} of {len(verdicts)}"
          + ("".join(f"\n[{NAME}]   missed {v['target']} at T={v['tokens_per_rank']}: "
                     f"{v['value']:.2f} (goal {v['goal']})" for v in missed)), flush=True)
    summary = {"targets": TARGETS, "verdicts": verdicts, "met": not missed,
               "host_defaults_ours": ours[0].get("host_defaults")}
    if not args.no_plot:
        draw_plot(args.out, rows)
    bc.write_results(args.out, NAME, {
        "config": {"ranks": WORLD, "experts": EXPERTS, "top_k": TOP_K, "hidden": HIDDEN,
                   "ffn": FFN, "dtype": "float32", "repeats": repeats, "sizes": plan,
                   "torch_threads_per_process": 1, "quick": args.quick,
                   "ours": "MoELayer(config_from_hf(Mixtral dict, expert_parallel=4)), defaults"},
        "method": __doc__.split("\n\n", 2)[2], "results": results, "rows": rows,
        "summary": summary})
    return 0


def draw_plot(out_dir, rows):
    def draw(plt):
        for phase, marker in (("train", "o"), ("prefill", "s"), ("decode", "^")):
            chosen = [r for r in rows if r["phase"] == phase]
            plt.plot([r["tokens_per_rank"] for r in chosen], [r["vs_torch_ep"] for r in chosen],
                     marker=marker, label=f"{phase}: x PyTorch index-based EP")
            if phase == "train":
                plt.plot([r["tokens_per_rank"] for r in chosen],
                         [r["vs_fairscale"] for r in chosen], marker=marker, linestyle="--",
                         label="train: x fairscale")
        plt.axhline(1.0, color="grey", linewidth=0.8)
        plt.xscale("log", base=2)
        plt.xlabel("tokens per rank")
        plt.ylabel("speed-up of mindspore_moe_ep (higher is better)")
        plt.title(f"MoE layer at EP {WORLD}, as a user runs it (H={HIDDEN}, F={FFN}, "
                  f"{EXPERTS} experts, top-{TOP_K})")
        plt.legend(fontsize=8)
    bc.save_plot(out_dir, NAME, draw)


if __name__ == "__main__":
    sys.exit(main())
