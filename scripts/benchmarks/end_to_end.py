#!/usr/bin/env python
"""End to end: MoE layer forward + backward tokens/s at EP 4 vs fairscale's MOELayer.

    python scripts/benchmarks/end_to_end.py [--quick] [--out DIR]

Both sides: 4 local worker processes (expert parallelism 4), E = 16 experts (4 per rank), top-2
softmax gate, SwiGLU experts ``down(silu(x W_gate) * (x W_up))`` of hidden H and width F, no
shared expert, float32, T tokens per rank; one step = forward, loss = mean squared error
against a fixed target, backward to every parameter and the input (no optimiser update).

- ``mindspore_moe_ep``: ``MoELayer`` in GRAPH_MODE under msrun (prefill path: sparse
  all-to-all-v over the shared-memory window, dropless), ``mindspore.value_and_grad``;
- ``fairscale``: ``fairscale.nn.MOELayer`` with its ``Top2Gate`` (GShard: capacity 2 * T / E
  per expert, tokens beyond it dropped; einsum dispatch; ``all_to_all_single`` over gloo),
  PyTorch CPU, the same sizes. If fairscale is not installed, a minimal equivalent written
  here (top-2 gate, capacity-padded all_to_all over gloo, per-expert FFN) is used instead, and
  the result says so.

Tokens/s = 4 * T / step time, the step time being the slowest rank's best repetition (each
repetition starts after a barrier). Also reported: the CPU time of a step summed over the ranks
(each rank's least), a figure that other jobs on a shared machine disturb much less. Threads per process: the cores shared evenly (same policy
for both). Target: >= 2x fairscale.
"""
import os
import sys
import time

import numpy as np

import bench_common as bc

NAME = "end_to_end"
WORLD, EXPERTS, TOP_K = 4, 16, 2


def settings(quick):
    """(tokens per rank, hidden, ffn, repeats)."""
    return (512, 1024, 512, 3) if quick else (2048, 1024, 1024, 5)


def time_steps(step, repeats, barrier):
    """A first (compiling) step, then `repeats` steps each started after a barrier: the best and
    median wall time, and the CPU time (all threads of this process) of the step with the least,
    which other jobs on a shared machine disturb much less than wall time."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    samples, cpu_samples = [], []
    for _ in range(repeats):
        barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        samples.append(time.perf_counter() - start)
        cpu_samples.append(time.process_time() - cpu_start)
    return {"min_s": min(samples), "median_s": float(np.median(samples)),
            "cpu_s": min(cpu_samples), "first_call_s": first}


def ms_worker(quick):
    import mindspore as ms
    from mindspore import Tensor
    import mindspore_moe_ep as mee
    from mindspore_moe_ep.comm.window import world_all_gather
    rank = bc.start_mindspore("graph", distributed=True)
    tokens, hidden, ffn, repeats = settings(quick)
    config = mee.MoEConfig.from_dict({
        "model": {"hidden_size": hidden, "num_experts": EXPERTS, "expert_ffn_size": ffn},
        "router": {"top_k": TOP_K, "score_func": "softmax"},
        "parallel": {"expert_parallel": WORLD},
        "dispatch": {"max_tokens_per_rank": tokens, "transport": "shm"},
        "runtime": {"mode": "graph", "dtype": "float32"}})
    layer = mee.MoELayer(config)
    layer.set_train(True)
    rng = np.random.default_rng(rank)
    x = Tensor(rng.standard_normal((tokens, hidden), dtype=np.float32))
    target = Tensor(rng.standard_normal((tokens, hidden), dtype=np.float32))

    def loss_fn(inputs, goal):
        diff = layer(inputs, "prefill") - goal
        return (diff * diff).mean()

    grad_fn = ms.value_and_grad(loss_fn, 0, layer.trainable_params())

    def step():
        loss, (dx, grads) = grad_fn(x, target)
        loss.asnumpy()
        dx.asnumpy()

    timings = time_steps(step, repeats, barrier=lambda: world_all_gather(np.zeros(1, np.int32)))
    bc.write_worker_result({"rank": rank, **timings,
                            "parameters": int(sum(p.size for p in layer.trainable_params()))})


def torch_worker(quick):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens, hidden, ffn, repeats = settings(quick)
    local = EXPERTS // world
    torch.manual_seed(rank)

    class SwiGLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = torch.nn.Linear(hidden, 2 * ffn, bias=False)
            self.down = torch.nn.Linear(ffn, hidden, bias=False)

        def forward(self, x):
            gate_up = self.gate_up(x)
            return self.down(torch.nn.functional.silu(gate_up[..., :ffn]) * gate_up[..., ffn:])

    experts = torch.nn.ModuleList([SwiGLU() for _ in range(local)])
    try:
        from fairscale.nn import MOELayer, Top2Gate
        implementation = "fairscale.nn.MOELayer + Top2Gate"
        moe = MOELayer(Top2Gate(hidden, EXPERTS), experts)
    except ImportError:
        implementation = "minimal torch equivalent (fairscale not installed)"
        moe = MinimalMoE(hidden, EXPERTS, experts, world)
    rng = np.random.default_rng(rank)
    # fairscale wants (s, t, m) with s divisible by the local experts
    x = torch.from_numpy(rng.standard_normal((local, tokens // local, hidden),
                                             dtype=np.float32)).requires_grad_(True)
    target = torch.from_numpy(rng.standard_normal((local, tokens // local, hidden),
                                                  dtype=np.float32))

    def step():
        moe.zero_grad(set_to_none=True)
        x.grad = None
        loss = ((moe(x) - target) ** 2).mean()
        loss.backward()

    timings = time_steps(step, repeats, barrier=dist.barrier)
    dist.destroy_process_group()
    bc.write_worker_result({"rank": rank, **timings, "implementation": implementation,
                            "parameters": int(sum(p.numel() for p in moe.parameters()))})


class MinimalMoE:  # pragma: no cover - used only without fairscale
    """Top-2 gate, capacity-padded all_to_all over gloo, per-expert FFN (GShard, like fairscale)."""

    def __new__(cls, hidden, num_experts, experts, world):
        import torch
        import torch.distributed as dist

        class AllToAll(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                out = torch.empty_like(x)
                dist.all_to_all_single(out, x.contiguous())
                return out

            @staticmethod
            def backward(ctx, grad):
                out = torch.empty_like(grad)
                dist.all_to_all_single(out, grad.contiguous())
                return out

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
                self.experts = experts

            def forward(self, x):
                shape = x.shape
                tokens = x.reshape(-1, shape[-1])
                count = tokens.shape[0]
                capacity = 2 * ((count + num_experts - 1) // num_experts)
                probs = torch.softmax(self.gate(tokens), dim=1)
                top_w, top_i = probs.topk(2, dim=1)
                top_w = top_w / top_w.sum(1, keepdim=True)
                mask = torch.nn.functional.one_hot(top_i, num_experts)            # [S, 2, E]
                position = (torch.cumsum(mask.reshape(-1, num_experts), 0).reshape(
                    count, 2, num_experts) - 1) * mask
                keep = (position < capacity) & (mask > 0)
                slot = torch.nn.functional.one_hot(position.clamp(0, capacity - 1).sum(2),
                                                   capacity)                       # [S, 2, c]
                weights = (top_w.unsqueeze(2) * keep.any(2, keepdim=True)).unsqueeze(3)
                combine = (mask.unsqueeze(3) * slot.unsqueeze(2) * weights).sum(1)  # [S, E, c]
                dispatched = torch.einsum("sec,sm->ecm", (combine > 0).float(), tokens)
                received = AllToAll.apply(dispatched).reshape(world, len(self.experts), -1,
                                                              shape[-1])
                outputs = torch.cat([expert(received[:, e:e + 1]) for e, expert in
                                     enumerate(self.experts)], dim=1)
                returned = AllToAll.apply(outputs).reshape(num_experts, -1, shape[-1])
                return torch.einsum("sec,ecm->sm", combine, returned).reshape(shape)

        return Module()


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    args = parser.parse_args(argv)
    if args.role == "ms":
        return ms_worker(args.quick)
    if args.role == "torch":
        return torch_worker(args.quick)

    tokens, hidden, ffn, repeats = settings(args.quick)
    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    print(f"[{NAME}] EP {WORLD}, {EXPERTS} experts, top-{TOP_K}, T={tokens}/rank, H={hidden}, "
          f"F={ffn}, float32, forward + backward", flush=True)
    threads = bc.threads_per_process(WORLD)
    environment = {"MOE_EP_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads),
                   "OMP_NUM_THREADS": str(threads)}
    script = os.path.abspath(__file__)
    extra = ["--quick"] if args.quick else []
    progress = bc.Progress(NAME, 2)
    ours = bc.launch_msrun(script, WORLD, ["--role", "ms", *extra], env=environment)
    progress.step("mindspore_moe_ep MoELayer")
    try:
        import torch  # noqa: F401
        peer = bc.launch_processes(script, WORLD, ["--role", "torch", *extra], env=environment)
    except ImportError:
        peer = None
        print(f"[{NAME}] torch is not installed: the peer comparison is skipped", flush=True)
    progress.step("PyTorch peer")

    def tokens_per_s(reports):
        return WORLD * tokens / max(r["min_s"] for r in reports)

    def cpu_s(reports):  # CPU seconds of one step, all ranks
        return sum(r["cpu_s"] for r in reports)
    result = {"mindspore_moe_ep": {"tokens_per_s": tokens_per_s(ours),
                                   "step_s": max(r["min_s"] for r in ours),
                                   "cpu_s": cpu_s(ours),
                                   "first_call_s": max(r["first_call_s"] for r in ours),
                                   "parameters_per_rank": ours[0]["parameters"]}}
    if peer:
        result["peer"] = {"implementation": peer[0]["implementation"],
                          "tokens_per_s": tokens_per_s(peer),
                          "step_s": max(r["min_s"] for r in peer),
                          "cpu_s": cpu_s(peer),
                          "parameters_per_rank": peer[0]["parameters"]}
        ratio = result["mindspore_moe_ep"]["tokens_per_s"] / result["peer"]["tokens_per_s"]
        cpu_ratio = result["peer"]["cpu_s"] / result["mindspore_moe_ep"]["cpu_s"]
    else:
        ratio = cpu_ratio = float("nan")
    rows = [["mindspore_moe_ep MoELayer (GRAPH_MODE, msrun)",
             result["mindspore_moe_ep"]["step_s"] * 1e3,
             result["mindspore_moe_ep"]["tokens_per_s"], 1.0,
             result["mindspore_moe_ep"]["cpu_s"]]]
    if peer:
        rows.append([result["peer"]["implementation"] + " (gloo)",
                     result["peer"]["step_s"] * 1e3, result["peer"]["tokens_per_s"], 1 / ratio,
                     result["peer"]["cpu_s"]])
    print(bc.table(["implementation", "step ms", "tokens/s (4 ranks)", "relative",
                    "CPU s/step (4 ranks)"], rows))
    summary = {"target": ">= 2x fairscale", "ratio": ratio, "met": bool(ratio >= 2),
               "cpu_time_ratio": cpu_ratio,
               "peer": result.get("peer", {}).get("implementation")}
    print(f"[{NAME}] mindspore_moe_ep = {ratio:.2f}x the peer (target 2x); CPU time per step: "
          f"{cpu_ratio:.2f}x less", flush=True)
    bc.write_results(args.out, NAME, {
        "config": {"ranks": WORLD, "experts": EXPERTS, "top_k": TOP_K, "tokens_per_rank": tokens,
                   "hidden": hidden, "ffn": ffn, "dtype": "float32", "repeats": repeats,
                   "threads_per_process": threads, "quick": args.quick},
        "method": __doc__.split("\n\n", 2)[2], "results": result, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
