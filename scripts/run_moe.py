#!/usr/bin/env python
"""The main job: run an MoE layer described by a YAML config through prefill, decode and training.

Single process::

    python scripts/run_moe.py yaml_configs/tiny.yaml --expert-parallel 1

Under msrun (one process per expert-parallel rank; see scripts/msrun_moe.sh)::

    scripts/msrun_moe.sh yaml_configs/deepseek_v3_small_4cpu.yaml --workers 4

Prints per-phase latency and tokens/s, expert load balance, dropped rows, the dispatcher and how
the layer ran its experts (``MoELayer.dispatcher_for`` / ``experts_path``), and (under expert
parallelism) the largest difference from a single-process run of the same layer on the same
tokens. Writes a JSON summary with ``--json``.
"""
import argparse
import json
import os
import sys
import time

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config (see yaml_configs/)")
    parser.add_argument("--expert-parallel", type=int, default=None,
                        help="override parallel.expert_parallel (default: from the YAML, or the "
                             "world size under msrun)")
    parser.add_argument("--mode", choices=["graph", "pynative"], default=None,
                        help="override runtime.mode")
    parser.add_argument("--transport", choices=["auto", "shm", "allgather"], default=None,
                        help="override dispatch.transport (allgather: the multi-host fallback)")
    parser.add_argument("--quant", choices=["none", "int8"], default=None,
                        help="override dispatch.quant (int8: token rows travel as per-token int8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per phase")
    parser.add_argument("--json", default=None, help="write a JSON summary here (rank 0)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the comparison against the single-process result")
    return parser.parse_args(argv)


def log(rank, message):
    if rank == 0:
        print(f"[run_moe] {message}", flush=True)


def timed(fn, repeats):
    """(first-call seconds incl. compile, median seconds of the next ``repeats`` calls, result)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return first, float(np.median(times)) if times else first, result


def load_balance(tokens_per_expert):
    """max/mean load over experts: 1.0 is perfect balance."""
    counts = np.asarray(tokens_per_expert, dtype=np.float64)
    return float(counts.max() / counts.mean()) if counts.sum() > 0 else 1.0


def gather_rows(array, world_size):
    """AllGather of a per-rank array along axis 0 (every rank must call it)."""
    if world_size == 1:
        return array
    from mindspore import Tensor, ops
    return ops.AllGather()(Tensor(array)).asnumpy()


def main(argv=None):
    args = parse_args(argv)
    import mindspore as ms
    from mindspore import Tensor, nn
    import mindspore_moe_ep as mee
    from mindspore_moe_ep.runtime import mindspore_dtype

    world_size = int(os.environ.get("MS_WORKER_NUM", os.environ.get("RANK_SIZE", "1")))
    overrides = {}
    if args.expert_parallel is not None:
        overrides["expert_parallel"] = args.expert_parallel
    elif world_size == 1:
        overrides["expert_parallel"] = 1
    if args.mode is not None:
        overrides["mode"] = args.mode
    if args.transport is not None:
        overrides["transport"] = args.transport
    if args.quant is not None:
        overrides["quant"] = args.quant
    config = mee.load_config(args.config, **overrides)
    mee.setup_runtime(config)
    rank = 0
    if world_size > 1:
        from mindspore.communication import get_rank, init
        init()
        rank = get_rank()

    work = config.workload
    hidden = config.model.hidden_size
    log(rank, f"config {args.config}: {config.model.num_experts} experts, top-{config.router.top_k}, "
              f"hidden {hidden}, expert FFN {config.model.expert_ffn_size}, "
              f"EP {config.parallel.expert_parallel} x DP {world_size // config.parallel.expert_parallel}, "
              f"{config.runtime.mode} mode, {config.runtime.dtype}")
    build_start = time.perf_counter()
    layer = mee.MoELayer(config)
    log(rank, f"built MoELayer in {time.perf_counter() - build_start:.2f} s: "
              f"{len(layer.local_expert_indices)} local experts per rank, "
              f"{sum(p.size for p in layer.trainable_params()) / 1e6:.1f} M parameters per rank")
    check = world_size > 1 and not args.no_check
    # The single-process layer takes every rank's tokens: its buffers hold all of them.
    reference = mee.MoELayer(config.replace(
        expert_parallel=1,
        max_tokens_per_rank=config.dispatch.max_tokens_per_rank * world_size)) if check else None

    dtype = mindspore_dtype(config.runtime.dtype)
    data = np.random.default_rng(config.runtime.seed + 1000 + rank)
    summary = {"config": args.config, "world_size": world_size, "rank": rank, "phases": {}}

    def check_against_single_process(name, x_np, y):
        """Max |EP - single process| over all ranks' tokens (rank 0 computes the reference)."""
        all_x = gather_rows(x_np, world_size)
        all_y = gather_rows(y.astype(ms.float32).asnumpy(), world_size)
        if rank != 0:
            return None
        expected = reference(Tensor(all_x).astype(dtype)).astype(ms.float32).asnumpy()
        error = float(np.abs(all_y - expected).max())
        scale = float(np.abs(expected).max())
        log(rank, f"{name:8s} check vs single process: max |diff| {error:.3e} "
                  f"(output scale {scale:.3e})")
        return error

    def run_phase(name, phase, x_np):
        x = Tensor(x_np).astype(dtype)
        tokens = int(np.prod(x_np.shape[:-1]))
        first, median, y = timed(lambda: layer(x, phase), args.repeats)
        stats = layer.stats()
        result = {"phase": phase, "experts_path": layer.experts_path(tokens, phase),
                  "quantized": layer.plan(tokens, phase).quantized,
                  "dispatcher": type(layer.dispatcher_for(tokens, phase)).__name__,
                  "tokens_per_rank": tokens, "first_call_s": first,
                  "latency_ms": median * 1e3, "tokens_per_s": tokens * world_size / median,
                  "load_max_over_mean": load_balance(stats["routed_per_expert"]),
                  "dropped_rows": stats["num_dropped"]}
        log(rank, f"{name:8s} tokens/rank {tokens:6d}  latency {median * 1e3:9.2f} ms  "
                  f"tokens/s {result['tokens_per_s']:10.1f}  (first call {first:.2f} s)  "
                  f"load max/mean {result['load_max_over_mean']:.2f}  "
                  f"dropped {stats['num_dropped']}  {result['dispatcher']}, experts "
                  f"{result['experts_path']}{', rows int8' if result['quantized'] else ''}")
        if check:
            result["max_abs_diff_vs_single_process"] = check_against_single_process(
                name, x_np.reshape(-1, hidden), y.reshape(-1, hidden))
        summary["phases"][name] = result

    prefill_x = data.standard_normal((work.batch_size, work.prefill_seq_len, hidden),
                                     dtype=np.float32)
    run_phase("prefill", "prefill", prefill_x)
    for step in range(work.decode_steps):
        decode_x = data.standard_normal((work.decode_batch_size, 1, hidden), dtype=np.float32)
        run_phase(f"decode{step}", "decode", decode_x)

    if work.train_steps:
        layer.set_train(True)
        target = Tensor(data.standard_normal(prefill_x.shape, dtype=np.float32)).astype(dtype)
        inputs = Tensor(prefill_x).astype(dtype)
        optimizer = nn.SGD(layer.trainable_params(), learning_rate=work.learning_rate)
        reducer = mee.ExpertParallelGradReducer(layer, average=True)

        def loss_fn(x, y_target):
            diff = (layer(x, "prefill") - y_target).astype(ms.float32)
            return (diff * diff).mean()

        grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
        tokens = int(np.prod(prefill_x.shape[:-1]))
        for step in range(work.train_steps):
            start = time.perf_counter()
            loss, grads = grad_fn(inputs, target)
            optimizer(reducer(grads))
            if config.router.expert_bias:
                layer.update_expert_bias()
            elapsed = time.perf_counter() - start
            summary["phases"][f"train{step}"] = {
                "loss": float(loss.asnumpy()), "step_s": elapsed,
                "tokens_per_s": tokens * world_size / elapsed,
                "quantized": layer.plan(tokens, "prefill").quantized}
            log(rank, f"train    step {step}: loss {float(loss.asnumpy()):.6f}  {elapsed:.2f} s "
                      f"(step 0 includes compile)  aux loss {layer.stats()['aux_loss']:.3e}")

    if args.json and rank == 0:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        log(rank, f"wrote {args.json}")
    log(rank, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
