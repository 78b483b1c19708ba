#!/usr/bin/env python
"""Generate text with a trained MoE language model: prefill, then decode with a KV cache.

One process::

    python scripts/generate.py yaml_configs/lm_tiny.yaml --checkpoint runs/tiny \\
        --prompt "def main(" --prompt "import "

Under msrun (the prompts are spread round-robin over the ranks; every rank holds up to
``lm.max_batch_size`` sequences), see scripts/msrun_lm.sh. The prompt goes through one prefill
(the MoE layers' sparse all-to-all-v), then every sequence gets one token per decode step (the
fused Dispatch/Combine), greedy or sampled (--temperature, --top-p, --seed), until byte 0 (end of
sequence) or --max-new-tokens. Prints each prompt's text and the serving timings: time to first
token, time per output token, decode tokens/s, and the dispatcher and experts path of each phase;
--json prints everything as one JSON object instead; --load-stats FILE writes each MoE layer's
expert load over the timed generation (``layer.load_stats()``: its prefill and decode steps, up to
``parallel.load_window_steps`` of them) as ``{"layers": [stats, ...]}`` (plot it with
scripts/plot_expert_load.py). A first, untimed pass on the same shapes
compiles the graphs (GRAPH_MODE) and warms up the kernels (--no-warmup skips it).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_common import add_run_arguments, new_parser, start_run  # noqa: E402

PREFIX = "generate"
DEFAULT_PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def "]


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_run_arguments(parser)
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory of scripts/train.py (its latest checkpoint) or a "
                             "step_NNNNNN directory")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt (UTF-8 text; repeat for a batch); default: three Python "
                             "snippets")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--decode-phase", choices=["decode", "prefill"], default="decode",
                        help="MoE path of the decode steps: the fused operators (decode) or the "
                             "all-to-all-v (prefill), for comparisons")
    parser.add_argument("--json", action="store_true", help="print one JSON object (rank 0)")
    parser.add_argument("--with-logits", action="store_true",
                        help="include each prompt's first-token logits in the JSON")
    parser.add_argument("--no-warmup", action="store_true", help="time the first pass too")
    parser.add_argument("--load-stats", default=None, metavar="FILE",
                        help="write the MoE layers' expert load of the timed generation here "
                             "(JSON, rank 0)")
    return parser.parse_args(argv)


def fail(message):
    """Every rank validates the same arguments, so every rank stops with the same message."""
    raise SystemExit(f"error: {message}")


def assign_prompts(prompts, world_size, rank, batch):
    """Round-robin: global prompt i runs on rank i % W, in row i // W. Returns this rank's ids."""
    if len(prompts) > world_size * batch:
        fail(f"{len(prompts)} prompts exceed the batch: world size {world_size} x "
             f"lm.max_batch_size {batch} = {world_size * batch} sequences")
    return list(range(rank, len(prompts), world_size))


def gather_results(result, ids, world_size):
    """Every rank's (ids, tokens, finish reasons, first logits) on every rank, by prompt id."""
    local = {"ids": ids, "tokens": result.tokens, "finish": result.finish_reasons,
             "logits": result.first_logits.tolist(), "decode_s": result.decode_s,
             "prefill_s": result.prefill_s}
    if world_size == 1:
        return [local]
    from mindspore_moe_ep.comm.window import world_all_gather
    payload = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = world_all_gather(np.array([payload.size], np.int32))[:, 0]
    padded = np.zeros(int(sizes.max()) + (-int(sizes.max())) % 4, np.uint8)
    padded[:payload.size] = payload
    words = world_all_gather(padded.view(np.int32))                    # [W, n]
    return [json.loads(words[rank].view(np.uint8)[:sizes[rank]].tobytes())
            for rank in range(world_size)]


def write_load_stats(model, path, rank):
    """Every MoE layer's load_stats() (a collective) to ``path`` as JSON (rank 0 writes)."""
    from mindspore_moe_ep.load_balancing import load_stats_to_json
    layers = [load_stats_to_json(layer.load_stats()) for layer in model.moe_layers()]
    if rank == 0:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"layers": layers}, handle)


def phase_paths(model, tokens, phase):
    """Which dispatcher and experts path the first MoE layer takes for a step, and whether its
    token rows travel as int8 (dispatch.quant)."""
    layer = model.moe_layers()[0]
    plan = layer.plan(tokens, phase)
    return {"phase": phase, "tokens_per_rank": tokens,
            "dispatcher": type(layer.dispatcher_for(tokens, phase)).__name__,
            "experts_path": plan.experts_path, "quantized": plan.quantized}


def main(argv=None):
    args = parse_args(argv)
    prompts_text = args.prompt if args.prompt is not None else DEFAULT_PROMPTS
    prompts = [list(text.encode("utf-8")) for text in prompts_text]
    for index, prompt in enumerate(prompts):
        if not prompt:
            fail(f"--prompt number {index + 1} is empty; a prompt needs at least one byte")
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens = {args.max_new_tokens} is not allowed; expected >= 1")
    run = start_run(args)
    config, rank, world_size = run.config, run.rank, run.world_size
    lm = config.lm
    longest = max(len(prompt) for prompt in prompts)
    if longest + args.max_new_tokens - 1 > lm.max_seq_len:
        fail(f"the longest prompt ({longest} bytes) and --max-new-tokens {args.max_new_tokens} "
             f"need {longest + args.max_new_tokens - 1} positions of the KV cache; "
             f"lm.max_seq_len = {lm.max_seq_len}")
    if lm.max_batch_size * longest > config.dispatch.max_tokens_per_rank:
        fail(f"the prefill of lm.max_batch_size {lm.max_batch_size} x {longest} bytes = "
             f"{lm.max_batch_size * longest} tokens per rank exceeds "
             f"dispatch.max_tokens_per_rank = {config.dispatch.max_tokens_per_rank}")
    ids = assign_prompts(prompts, world_size, rank, lm.max_batch_size)

    from mindspore_moe_ep.models import MoETransformerLM
    from mindspore_moe_ep.models.checkpoint import CheckpointError, load_checkpoint
    from mindspore_moe_ep.models.generation import Generator, Sampling
    try:
        sampling = Sampling(args.temperature, args.top_p, args.seed)
    except ValueError as error:
        fail(str(error))
    model = MoETransformerLM(config, cache_batch_size=lm.max_batch_size,
                             moe_decode_phase=args.decode_phase)
    try:
        meta = load_checkpoint(args.checkpoint, model, config=config)
    except CheckpointError as error:
        fail(str(error))
    generator = Generator(model)
    local_prompts = [prompts[index] for index in ids]
    if not args.no_warmup:  # compile (GRAPH_MODE) and warm up on the same shapes, untimed
        generator.generate(local_prompts, min(args.max_new_tokens, 2), sampling, longest, ids)
        if generator.rebalance_interval:  # parallel.rebalance_interval: start balanced
            generator.rebalance()
    for layer in model.moe_layers():
        layer.reset_load_stats()    # the load window covers the timed generation only
    result = generator.generate(local_prompts, args.max_new_tokens, sampling, longest, ids)
    if args.load_stats:
        write_load_stats(model, args.load_stats, rank)
    per_rank = gather_results(result, ids, world_size)

    by_id = {}
    for report in per_rank:
        for index, tokens, finish, logits in zip(report["ids"], report["tokens"],
                                                 report["finish"], report["logits"]):
            by_id[index] = (tokens, finish, logits)
    generated = sum(len(by_id[index][0]) for index in by_id)
    decode_s = max(report["decode_s"] for report in per_rank)
    prefill_s = max(report["prefill_s"] for report in per_rank)
    decode_tokens = generated - len(prompts)  # the first token of each comes from the prefill
    summary = {
        "config": args.config, "checkpoint": args.checkpoint, "checkpoint_step": meta["step"],
        "checkpoint_expert_parallel": meta["expert_parallel"],
        "expert_parallel": config.parallel.expert_parallel, "world_size": world_size,
        "mode": config.runtime.mode, "batch_per_rank": lm.max_batch_size,
        "prompt_length": longest, "max_new_tokens": args.max_new_tokens,
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed},
        "timings": {
            "time_to_first_token_s": prefill_s,
            "time_per_output_token_s": decode_s / result.decode_steps if result.decode_steps
            else None,
            "decode_steps": result.decode_steps, "decode_s": decode_s,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
            "prefill_tokens_per_s": sum(map(len, prompts)) / prefill_s,
            "rebalances": result.rebalances, "rebalance_s": result.rebalance_s,
        },
        "paths": {"prefill": phase_paths(model, lm.max_batch_size * longest, "prefill"),
                  "decode": phase_paths(model, lm.max_batch_size, args.decode_phase)},
        "prompts": [],
    }
    for index, text in enumerate(prompts_text):
        tokens, finish, logits = by_id[index]
        entry = {"prompt": text, "tokens": tokens, "finish_reason": finish,
                 "text": bytes(token for token in tokens if token).decode("utf-8", "replace")}
        if args.with_logits:
            entry["first_logits"] = logits
        summary["prompts"].append(entry)
    if rank == 0:
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            print_report(summary, run)
    return summary


def print_report(summary, run):
    timings, paths = summary["timings"], summary["paths"]
    run.log(f"checkpoint step {summary['checkpoint_step']} (saved at EP "
            f"{summary['checkpoint_expert_parallel']}), EP {summary['expert_parallel']} on "
            f"{summary['world_size']} ranks, {summary['mode']} mode", PREFIX)
    for index, entry in enumerate(summary["prompts"]):
        run.log(f"prompt {index} ({entry['finish_reason']}, {len(entry['tokens'])} tokens): "
                f"{entry['prompt']!r} -> {entry['text']!r}", PREFIX)
    tpot = timings["time_per_output_token_s"]
    run.log(f"time to first token {timings['time_to_first_token_s'] * 1e3:.1f} ms, time per "
            f"output token {tpot * 1e3 if tpot else float('nan'):.2f} ms, decode "
            f"{timings['decode_tokens_per_s'] or 0:.1f} tokens/s over {timings['decode_steps']} "
            f"steps", PREFIX)
    for name in ("prefill", "decode"):
        path = paths[name]
        run.log(f"{name:7s}: MoE phase {path['phase']!r}, {path['tokens_per_rank']} tokens/rank, "
                f"{path['dispatcher']}, experts {path['experts_path']}"
                f"{', rows int8' if path['quantized'] else ''}", PREFIX)
    if timings["rebalances"]:
        run.log(f"experts rebalanced {timings['rebalances']} times during decode "
                f"(parallel.rebalance_interval; {timings['rebalance_s']:.2f} s, not in the decode "
                f"time)", PREFIX)


if __name__ == "__main__":
    main()
