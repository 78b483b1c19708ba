#!/usr/bin/env python
"""Serving benchmark: decode throughput of the whole MoE language model at EP 4.

    python scripts/benchmarks/lm_decode.py [--checkpoint RUN_DIR] [--quick] [--out DIR]

The model of ``yaml_configs/lm_deepseek_v3_mini_4cpu.yaml`` (the weights of ``--checkpoint``,
e.g. the main job's run directory; else its seeded initial weights), GRAPH_MODE, 16 prompts of
16-61 bytes (windows of the corpus's validation split), greedy, every sequence generating the
same number of new tokens (no early stop), one timed run after an untimed warm-up on the same
shapes:

- (a) ``fused``: EP 4 on 4 msrun workers, 4 sequences per rank; decode steps through the fused
  Dispatch/Combine (the MoE layers' ``phase="decode"``: FusedDeliver / FusedReturn);
- (b) ``prefill path``: the same, with the decode steps forced through the sparse all-to-all-v
  (``MoETransformerLM(moe_decode_phase="prefill")``);
- (c) ``EP 1``: one process holding every expert and all 16 sequences;
- (d) PyTorch with an all-to-all-v EP over gloo: not implemented (see docs/performance.md).

Decode tokens/s = (sequences x decode steps) / decode time (the slowest rank's). The decode
step's time split (rank 0): step = forward (the graph launch, through to the logits on the
host) + host (choosing tokens, the ranks' agreement on stopping), medians of the timed run;
within the forward, the MoE layers, estimated as the number of MoE layers x one MoE layer
called alone on the same [batch, 1, hidden] decode input (a graph of its own), the rest being
attention, norms, the dense layer and the LM head: minima of 20 alternated calls of the whole
forward and of the layer (other load on the machine inflates medians).
Target: (a) >= 1.2x the tokens/s of (b).
"""
import argparse
import importlib.util
import os
import sys

import numpy as np

import bench_common as bc

NAME = "lm_decode"
WORLD = 4
CONFIG = os.path.join(bc.REPOSITORY_ROOT, "yaml_configs", "lm_deepseek_v3_mini_4cpu.yaml")
PROMPTS = 16


def prompts():
    """16 byte prompts of 16, 19, ..., 61 bytes from the validation split (the same for all)."""
    from mindspore_moe_ep.training import load_corpus
    _, validation = load_corpus()
    return [validation[index * 4000:index * 4000 + 16 + 3 * index].tolist()
            for index in range(PROMPTS)]


def worker(args):
    """One run (a, b or c): generate, then time one MoE layer alone; report rank's figures."""
    import time
    sys.path.insert(0, os.path.join(bc.REPOSITORY_ROOT, "scripts"))
    from lm_common import start_run
    from mindspore import Tensor
    from mindspore_moe_ep.models import MoETransformerLM
    from mindspore_moe_ep.models.checkpoint import load_checkpoint
    from mindspore_moe_ep.models.generation import Generator

    batch = PROMPTS // WORLD if args.expert_parallel > 1 else PROMPTS
    texts = prompts()
    longest = max(map(len, texts))
    overrides = [f"lm.max_batch_size={batch}",
                 f"dispatch.max_tokens_per_rank={max(512, batch * longest)}"]
    run = start_run(argparse.Namespace(config=CONFIG, expert_parallel=args.expert_parallel,
                                       mode="graph", set=overrides))
    config = run.config
    model = MoETransformerLM(config, cache_batch_size=batch, moe_decode_phase=args.decode_phase)
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model, config=config)
    generator = Generator(model, end_of_sequence=None)
    ids = list(range(run.rank, PROMPTS, run.world_size))
    local = [texts[index] for index in ids]
    generator.generate(local, 3, prompt_length=longest, prompt_ids=ids)            # warm-up
    result = generator.generate(local, args.new_tokens, prompt_length=longest, prompt_ids=ids)

    # The split: the whole decode forward and one MoE layer alone, alternated (so that other
    # load on the machine hits both alike), 20 times each; the minima are compared.
    layer = model.moe_layers()[0]
    x = Tensor(np.random.default_rng(0).standard_normal(
        (batch, 1, config.model.hidden_size)).astype(np.float32))
    step_tokens = Tensor(np.ones((batch, 1), np.int32))
    step_positions = Tensor(np.full(batch, longest, np.int32))
    phase = args.decode_phase
    forward_times, layer_times = [], []
    for repeat in range(21):
        started = time.perf_counter()
        model(step_tokens, "decode", step_positions).asnumpy()
        middle = time.perf_counter()
        layer(x, phase).asnumpy()
        if repeat:  # the first calls compile the layer's own graph
            forward_times.append(middle - started)
            layer_times.append(time.perf_counter() - middle)
    bc.write_worker_result({
        "rank": run.rank, "sequences": len(local), "decode_steps": result.decode_steps,
        "decode_s": result.decode_s, "prefill_s": result.prefill_s,
        "step_median_s": float(np.median(result.step_times)),
        "forward_median_s": float(np.median(result.forward_times)),
        "forward_min_s": float(np.min(forward_times)),
        "moe_layer_min_s": float(np.min(layer_times)),
        "moe_layers": len(model.moe_layers()),
        "dispatcher": type(layer.dispatcher_for(batch, phase)).__name__,
        "experts_path": layer.experts_path(batch, phase),
        "tokens": result.tokens,
    })


def summarize(name, reports):
    decode_s = max(report["decode_s"] for report in reports)
    steps = reports[0]["decode_steps"]
    sequences = sum(report["sequences"] for report in reports)
    first = reports[0]
    moe = first["moe_layers"] * first["moe_layer_min_s"]
    return {"run": name, "ranks": len(reports), "sequences": sequences, "decode_steps": steps,
            "decode_tokens_per_s": sequences * steps / decode_s,
            "time_per_output_token_ms": decode_s / steps * 1e3,
            "time_to_first_token_ms": max(r["prefill_s"] for r in reports) * 1e3,
            "step_ms": first["step_median_s"] * 1e3, "forward_ms": first["forward_median_s"] * 1e3,
            "forward_min_ms": first["forward_min_s"] * 1e3, "moe_ms": moe * 1e3,
            "rest_of_forward_ms": (first["forward_min_s"] - moe) * 1e3,
            "host_ms": (first["step_median_s"] - first["forward_median_s"]) * 1e3,
            "dispatcher": first["dispatcher"], "experts_path": first["experts_path"],
            "tokens": [tokens for report in reports for tokens in report["tokens"]]}


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    parser.add_argument("--checkpoint", default=None, help="a run directory of scripts/train.py")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--expert-parallel", type=int, default=WORLD, help=argparse.SUPPRESS)
    parser.add_argument("--decode-phase", default="decode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or (16 if args.quick else 48)
    if args.role == "ms":
        return worker(args)

    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    script = os.path.abspath(__file__)
    common = ["--role", "ms", "--new-tokens", args.new_tokens]
    if args.checkpoint:
        common += ["--checkpoint", os.path.abspath(args.checkpoint)]
    progress = bc.Progress(NAME, 3)
    runs = {}
    runs["fused"] = summarize("fused", bc.launch_msrun(script, WORLD, common))
    progress.step("(a) EP 4, fused decode operators")
    runs["prefill_path"] = summarize("prefill_path", bc.launch_msrun(
        script, WORLD, common + ["--decode-phase", "prefill"]))
    progress.step("(b) EP 4, decode steps through the prefill path")
    runs["ep1"] = summarize("ep1", bc.launch_processes(
        script, 1, common + ["--expert-parallel", "1"]))
    progress.step("(c) EP 1, one process")
    if importlib.util.find_spec("torch") is not None:
        print(f"[{NAME}] (d) PyTorch + gloo: not implemented (see docs/performance.md)")
    else:
        print(f"[{NAME}] (d) PyTorch + gloo: skipped, torch is not installed")

    fused = runs["fused"]["decode_tokens_per_s"]
    headers = ["run", "ranks", "dispatcher / experts", "decode tok/s", "(a) / this", "TPOT ms",
               "TTFT ms", "step ms", "host ms", "forward min ms", "MoE ms", "rest ms"]
    rows = [[name, run["ranks"], f"{run['dispatcher']} / {run['experts_path']}",
             f"{run['decode_tokens_per_s']:.1f}", f"{fused / run['decode_tokens_per_s']:.2f}x",
             f"{run['time_per_output_token_ms']:.1f}", f"{run['time_to_first_token_ms']:.0f}",
             f"{run['step_ms']:.1f}", f"{run['host_ms']:.1f}", f"{run['forward_min_ms']:.1f}",
             f"{run['moe_ms']:.1f}", f"{run['rest_of_forward_ms']:.1f}"]
            for name, run in runs.items()]
    print(bc.table(headers, rows), flush=True)
    same = runs["fused"]["tokens"] == runs["prefill_path"]["tokens"]
    ratio = fused / runs["prefill_path"]["decode_tokens_per_s"]
    print(f"[{NAME}] (a) / (b) = {ratio:.2f}x (target >= 1.2x: "
          f"{'met' if ratio >= 1.2 else 'not met'}); greedy tokens of (a) and (b) "
          f"{'equal' if same else 'DIFFER'}", flush=True)
    path = bc.write_results(args.out, NAME, {
        "new_tokens": args.new_tokens, "checkpoint": args.checkpoint, "runs": runs,
        "fused_over_prefill_path": ratio, "fused_over_ep1": fused / runs["ep1"][
            "decode_tokens_per_s"], "tokens_equal": same, "target_met": ratio >= 1.2})
    print(f"[{NAME}] wrote {path}", flush=True)


if __name__ == "__main__":
    main()
