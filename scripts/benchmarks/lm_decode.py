#!/usr/bin/env python
"""Serving benchmark: decode throughput of the whole MoE language model at EP 4.

    python scripts/benchmarks/lm_decode.py [--checkpoint RUN_DIR] [--quick] [--out DIR]
        [--config YAML] [--runs abcd] [--tables main,exchange]

The model of ``--config`` (default ``yaml_configs/lm_deepseek_v3_mini_4cpu.yaml``; the weights
of ``--checkpoint``, e.g. the main job's run directory; else its seeded initial weights),
GRAPH_MODE, 16 prompts of 16-61 bytes (windows of the corpus's validation split), greedy, every
sequence generating the same number of new tokens (no early stop), one timed run after an
untimed warm-up on the same shapes:

- (a) ``fused``: EP 4 on 4 msrun workers, 4 sequences per rank; decode steps through the fused
  Dispatch/Combine (the MoE layers' ``phase="decode"``: FusedDeliver / FusedReturn);
- (b) ``prefill path``: the same, with the decode steps forced through the sparse all-to-all-v
  (``MoETransformerLM(moe_decode_phase="prefill")``);
- (c) ``EP 1``: one process holding every expert and all 16 sequences;
- (d) ``torch``: the same model in PyTorch (``lm_decode_torch.py``) with the same weights
  (exported once from the MindSpore model at EP 1 to a NumPy .npz), EP 4 on 4 processes of 1
  thread each, the MoE exchange an index-based all-to-all-v over gloo (``all_to_all_single`` of
  counts, rows, and the rows back), 4 sequences per rank, the same generation loop; its greedy
  tokens are compared with (a)'s.

The second table (``exchange``, the issue's "a configuration where the exchange is a larger
share"): (a) and (b) again on a variant of the same config built here, seeded initial weights:
the MoE layers in bfloat16 (``runtime.dtype``; the experts' GEMMs on the CPU's bf16 units, the
token rows exchanged in bf16), experts 4x narrower (``model.expert_ffn_size`` 32, and with it
the dense and shared FFNs) and 16 sequences per rank (64 prompts), so that per decode step the
exchange moves 4x the rows while each row's expert work is 4x smaller.

Decode tokens/s = (sequences x decode steps) / decode time (the slowest rank's). The decode
step's time split (rank 0): step = forward (the graph launch, through to the logits on the
host) + host (choosing tokens, the ranks' agreement on stopping), medians of the timed run;
within the forward, the MoE layers, estimated as the number of MoE layers x one MoE layer
called alone on the same [batch, 1, hidden] decode input (a graph of its own), the rest being
attention, norms, the dense layer and the LM head: minima of 20 alternated calls of the whole
forward and of the layer (other load on the machine inflates medians).
Targets: (a) >= 1.2x the tokens/s of (b); (a) ahead of (d) (> 1x its tokens/s).
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

import bench_common as bc

NAME = "lm_decode"
WORLD = 4
CONFIG = os.path.join(bc.REPOSITORY_ROOT, "yaml_configs", "lm_deepseek_v3_mini_4cpu.yaml")
SEQUENCES_PER_RANK = 4
# The exchange-heavy variant (second table): overrides of the config, and sequences per rank.
EXCHANGE_HEAVY_SET = ["runtime.dtype=bfloat16", "model.expert_ffn_size=32"]
EXCHANGE_HEAVY_SEQUENCES_PER_RANK = 16
TARGETS = {"fused_over_prefill_path": 1.2, "fused_over_torch": 1.0}
RUN_NAMES = {"a": "fused", "b": "prefill_path", "c": "ep1", "d": "torch"}
AGREEMENT_PREFIX = 8  # the "first several tokens" of the correctness check


def prompts(count=SEQUENCES_PER_RANK * WORLD):
    """``count`` byte prompts from the validation split (the same for every run): prompt i is
    the window at byte 4000 i of 16 + 3 (i mod 16) bytes (16, 19, ..., 61; the first 16 are
    the 16 prompts of the main table)."""
    from mindspore_moe_ep.training import load_corpus
    _, validation = load_corpus()
    return [validation[index * 4000:index * 4000 + 16 + 3 * (index % 16)].tolist()
            for index in range(count)]


def start(args, batch, longest):
    """(run, config): MindSpore started on --config with this run's overrides."""
    sys.path.insert(0, os.path.join(bc.REPOSITORY_ROOT, "scripts"))
    from lm_common import start_run
    overrides = [f"lm.max_batch_size={batch}",
                 f"dispatch.max_tokens_per_rank={max(512, batch * longest)}", *args.set]
    run = start_run(argparse.Namespace(config=args.config, expert_parallel=args.expert_parallel,
                                       mode="graph", set=overrides))
    return run, run.config


def export(args):
    """The weights of the model of (a)-(c), for (d): ``weights.npz`` (every saved Parameter of
    MoETransformerLM at EP 1, by name, float32) and ``meta.json`` (config, prompts)."""
    import mindspore as ms
    from mindspore import ops
    from mindspore_moe_ep.models import MoETransformerLM
    from mindspore_moe_ep.models.checkpoint import is_model_state, load_checkpoint
    texts = prompts(args.sequences_per_rank * WORLD)
    longest = max(map(len, texts))
    _, config = start(args, args.sequences_per_rank, longest)
    model = MoETransformerLM(config)
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model, config=config)
    weights = {name: ops.cast(param, ms.float32).asnumpy() for name, param in
               model.parameters_and_names() if is_model_state(name)}
    os.makedirs(args.export, exist_ok=True)
    np.savez(os.path.join(args.export, "weights.npz"), **weights)
    with open(os.path.join(args.export, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump({"config": config.to_dict(), "prompts": texts, "prompt_length": longest,
                   "checkpoint": args.checkpoint}, handle)
    bc.write_worker_result({"rank": 0, "parameters": len(weights),
                            "values": int(sum(value.size for value in weights.values()))})


def worker(args):
    """One run (a, b or c): generate, then time one MoE layer alone; report rank's figures."""
    import time
    from mindspore import Tensor
    from mindspore_moe_ep.models import MoETransformerLM
    from mindspore_moe_ep.models.checkpoint import load_checkpoint
    from mindspore_moe_ep.models.generation import Generator

    count = args.sequences_per_rank * WORLD
    batch = args.sequences_per_rank if args.expert_parallel > 1 else count
    texts = prompts(count)
    longest = max(map(len, texts))
    run, config = start(args, batch, longest)
    model = MoETransformerLM(config, cache_batch_size=batch, moe_decode_phase=args.decode_phase)
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model, config=config)
    generator = Generator(model, end_of_sequence=None)
    ids = list(range(run.rank, count, run.world_size))
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
        "rank": run.rank, "sequences": len(local), "prompt_ids": ids,
        "decode_steps": result.decode_steps,
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
    by_prompt = sorted((index, tokens) for report in reports
                       for index, tokens in zip(report["prompt_ids"], report["tokens"]))
    return {"run": name, "ranks": len(reports), "sequences": sequences, "decode_steps": steps,
            "decode_tokens_per_s": sequences * steps / decode_s,
            "time_per_output_token_ms": decode_s / steps * 1e3,
            "time_to_first_token_ms": max(r["prefill_s"] for r in reports) * 1e3,
            "step_ms": first["step_median_s"] * 1e3, "forward_ms": first["forward_median_s"] * 1e3,
            "forward_min_ms": first["forward_min_s"] * 1e3, "moe_ms": moe * 1e3,
            "rest_of_forward_ms": (first["forward_min_s"] - moe) * 1e3,
            "host_ms": (first["step_median_s"] - first["forward_median_s"]) * 1e3,
            "dispatcher": first["dispatcher"], "experts_path": first["experts_path"],
            "tokens": [tokens for _, tokens in by_prompt]}  # by prompt index


def agreement(reference, other, prefix=AGREEMENT_PREFIX):
    """How far the greedy tokens of ``other`` follow ``reference`` (lists per prompt)."""
    common = []
    for ours, theirs in zip(reference, other):
        length = 0
        while length < min(len(ours), len(theirs)) and ours[length] == theirs[length]:
            length += 1
        common.append(length)
    total = sum(len(tokens) for tokens in reference)
    equal = sum(a == b for ours, theirs in zip(reference, other) for a, b in zip(ours, theirs))
    return {"sequences": len(reference), "identical_sequences": sum(
                c == len(tokens) for c, tokens in zip(common, reference)),
            "common_prefix_per_sequence": common, "common_prefix_min": min(common),
            "common_prefix_median": float(np.median(common)),
            f"first_{prefix}_equal_sequences": sum(
                c >= min(prefix, len(tokens)) for c, tokens in zip(common, reference)),
            "positions_equal_fraction": equal / total}


def describe_agreement(name, agree):
    return (f"{name}: {agree['identical_sequences']}/{agree['sequences']} sequences identical, "
            f"first {AGREEMENT_PREFIX} tokens equal in "
            f"{agree[f'first_{AGREEMENT_PREFIX}_equal_sequences']}/{agree['sequences']}, "
            f"common prefix min {agree['common_prefix_min']} / median "
            f"{agree['common_prefix_median']:.0f} tokens, "
            f"{100 * agree['positions_equal_fraction']:.0f}% of positions equal")


def print_table(runs):
    fused = runs["fused"]["decode_tokens_per_s"] if "fused" in runs else float("nan")
    headers = ["run", "ranks", "dispatcher / experts", "decode tok/s", "(a) / this", "TPOT ms",
               "TTFT ms", "step ms", "host ms", "forward min ms", "MoE ms", "rest ms"]
    rows = [[name, run["ranks"], f"{run['dispatcher']} / {run['experts_path']}",
             f"{run['decode_tokens_per_s']:.1f}", f"{fused / run['decode_tokens_per_s']:.2f}x",
             f"{run['time_per_output_token_ms']:.1f}", f"{run['time_to_first_token_ms']:.0f}",
             f"{run['step_ms']:.1f}", f"{run['host_ms']:.1f}", f"{run['forward_min_ms']:.1f}",
             f"{run['moe_ms']:.1f}", f"{run['rest_of_forward_ms']:.1f}"]
            for name, run in runs.items()]
    print(bc.table(headers, rows), flush=True)


def main(argv=None):
    parser = bc.argument_parser(__doc__.split("\n\n")[0], worker_roles=True)
    parser.add_argument("--checkpoint", default=None,
                        help="a run directory of scripts/train.py (main table only)")
    parser.add_argument("--config", default=CONFIG,
                        help="the model's YAML config (default: the mini DeepSeek-V3 config)")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--runs", default="abcd",
                        help="which runs of the main table: letters of abcd (default all)")
    parser.add_argument("--tables", default="main,exchange",
                        help="main (runs a-d), exchange (the exchange-heavy variant, a and b), "
                             "or both (default)")
    parser.add_argument("--expert-parallel", type=int, default=WORLD, help=argparse.SUPPRESS)
    parser.add_argument("--decode-phase", default="decode", help=argparse.SUPPRESS)
    parser.add_argument("--sequences-per-rank", type=int, default=SEQUENCES_PER_RANK,
                        help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--export", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or (16 if args.quick else 48)
    args.config = os.path.abspath(args.config)
    if args.role == "ms":
        return export(args) if args.export else worker(args)
    if args.role == "torch":
        import lm_decode_torch
        return lm_decode_torch.worker(args)

    tables = set(args.tables.split(","))
    letters = [letter for letter in "abcd" if letter in args.runs]
    if not tables <= {"main", "exchange"} or not letters or set(args.runs) - set("abcd"):
        parser.error("--tables takes main and/or exchange; --runs letters of abcd")
    if "d" in letters and importlib.util.find_spec("torch") is None:
        print(f"[{NAME}] (d) PyTorch + gloo: skipped, torch is not installed", flush=True)
        letters.remove("d")
    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    script = os.path.abspath(__file__)
    common = ["--new-tokens", args.new_tokens, "--config", args.config]
    main_common = common + (["--checkpoint", os.path.abspath(args.checkpoint)]
                            if args.checkpoint else [])
    steps = (len(letters) + ("d" in letters) if "main" in tables else 0) + \
        (2 if "exchange" in tables else 0)
    progress = bc.Progress(NAME, steps)
    payload = {"new_tokens": args.new_tokens, "checkpoint": args.checkpoint,
               "config": os.path.relpath(args.config, bc.REPOSITORY_ROOT),
               "weights": "checkpoint " + args.checkpoint if args.checkpoint
               else "seeded initial weights", "targets": TARGETS, "verdicts": []}

    def ms_runs(extra, chosen):
        runs = {}
        if "a" in chosen:
            runs["fused"] = summarize("fused", bc.launch_msrun(
                script, WORLD, ["--role", "ms", *extra]))
            progress.step("(a) EP 4, fused decode operators")
        if "b" in chosen:
            runs["prefill_path"] = summarize("prefill_path", bc.launch_msrun(
                script, WORLD, ["--role", "ms", *extra, "--decode-phase", "prefill"]))
            progress.step("(b) EP 4, decode steps through the prefill path")
        if "c" in chosen:
            runs["ep1"] = summarize("ep1", bc.launch_processes(
                script, 1, ["--role", "ms", *extra, "--expert-parallel", "1"]))
            progress.step("(c) EP 1, one process")
        return runs

    def verdict(target, value, what):
        met = bool(value >= TARGETS[target]) if target == "fused_over_prefill_path" \
            else bool(value > TARGETS[target])
        goal = f">= {TARGETS[target]}" if target == "fused_over_prefill_path" \
            else f"> {TARGETS[target]}"
        payload["verdicts"].append({"target": target, "table": what, "value": value,
                                    "goal": goal, "met": met})
        return f"target {goal}x: {'met' if met else 'not met'}"

    if "main" in tables:
        runs = ms_runs(main_common, letters)
        if "d" in letters:
            weights_dir = tempfile.mkdtemp(prefix="moe_ep_lm_decode_weights_")
            bc.launch_processes(script, 1, ["--role", "ms", *main_common, "--expert-parallel",
                                            "1", "--export", weights_dir])
            progress.step("weights exported for (d) (MindSpore model at EP 1 -> .npz)")
            try:
                runs["torch"] = summarize("torch", bc.launch_processes(
                    script, WORLD, ["--role", "torch", "--new-tokens", args.new_tokens,
                                    "--weights", weights_dir]))
            finally:
                for leaf in ("weights.npz", "meta.json"):
                    if os.path.exists(os.path.join(weights_dir, leaf)):
                        os.remove(os.path.join(weights_dir, leaf))
                os.rmdir(weights_dir)
            progress.step("(d) PyTorch, EP 4 over gloo, 1 thread per process")
        payload["runs"] = runs
        print(f"[{NAME}] main table: {payload['config']}, {payload['weights']}, "
              f"{SEQUENCES_PER_RANK} sequences per rank, {args.new_tokens} new tokens", flush=True)
        if "fused" in runs:
            print_table(runs)
            fused = runs["fused"]["decode_tokens_per_s"]
            payload["agreement_with_fused"] = {}
            for name, run in runs.items():
                if name != "fused":
                    agree = agreement(runs["fused"]["tokens"], run["tokens"])
                    payload["agreement_with_fused"][name] = agree
                    print(f"[{NAME}] greedy tokens vs (a), " + describe_agreement(name, agree),
                          flush=True)
            if "prefill_path" in runs:
                ratio = fused / runs["prefill_path"]["decode_tokens_per_s"]
                same = runs["fused"]["tokens"] == runs["prefill_path"]["tokens"]
                payload.update(fused_over_prefill_path=ratio, tokens_equal=same,
                               target_met=ratio >= TARGETS["fused_over_prefill_path"])
                print(f"[{NAME}] (a) / (b) = {ratio:.2f}x ("
                      f"{verdict('fused_over_prefill_path', ratio, 'main')}); greedy tokens of "
                      f"(a) and (b) {'equal' if same else 'DIFFER'}", flush=True)
            if "ep1" in runs:
                payload["fused_over_ep1"] = fused / runs["ep1"]["decode_tokens_per_s"]
            if "torch" in runs:
                ratio = fused / runs["torch"]["decode_tokens_per_s"]
                payload.update(fused_over_torch=ratio,
                               target_vs_torch_met=ratio > TARGETS["fused_over_torch"])
                print(f"[{NAME}] (a) / (d) = {ratio:.2f}x ("
                      f"{verdict('fused_over_torch', ratio, 'main')})", flush=True)
        else:
            print_table(runs)

    if "exchange" in tables:
        extra = common + ["--sequences-per-rank", EXCHANGE_HEAVY_SEQUENCES_PER_RANK]
        for item in EXCHANGE_HEAVY_SET:
            extra += ["--set", item]
        runs = ms_runs(extra, "ab")
        ratio = runs["fused"]["decode_tokens_per_s"] / runs["prefill_path"]["decode_tokens_per_s"]
        same = runs["fused"]["tokens"] == runs["prefill_path"]["tokens"]
        agree = agreement(runs["fused"]["tokens"], runs["prefill_path"]["tokens"])
        print(f"[{NAME}] exchange-heavy table: {payload['config']} with "
              f"{', '.join(EXCHANGE_HEAVY_SET)}, seeded initial weights, "
              f"{EXCHANGE_HEAVY_SEQUENCES_PER_RANK} sequences per rank, {args.new_tokens} new "
              f"tokens", flush=True)
        print_table(runs)
        print(f"[{NAME}] exchange-heavy (a) / (b) = {ratio:.2f}x ("
              f"{verdict('fused_over_prefill_path', ratio, 'exchange_heavy')}); greedy tokens "
              f"of (a) and (b) {'equal' if same else 'DIFFER'}", flush=True)
        if not same:
            print(f"[{NAME}] greedy tokens vs (a), " + describe_agreement("prefill_path", agree),
                  flush=True)
        payload["exchange_heavy"] = {
            "set": EXCHANGE_HEAVY_SET, "sequences_per_rank": EXCHANGE_HEAVY_SEQUENCES_PER_RANK,
            "runs": runs, "fused_over_prefill_path": ratio, "tokens_equal": same,
            "agreement_with_fused": {"prefill_path": agree},
            "target_met": ratio >= TARGETS["fused_over_prefill_path"]}
    bc.write_results(args.out, NAME, payload)


if __name__ == "__main__":
    main()
