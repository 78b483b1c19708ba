#!/usr/bin/env python
"""The main job: train the MoE language model of a YAML config, then generate from its last
checkpoint (prefill + decode with the KV cache), in one launch.

    scripts/msrun_lm.sh yaml_configs/lm_deepseek_v3_mini_4cpu.yaml --workers 4 -- --out runs/mini
    python scripts/run_lm.py yaml_configs/lm_tiny.yaml --out runs/tiny      # one process, EP 1

Runs scripts/train.py (progress lines, OUT/metrics.jsonl, checkpoints in OUT), then
scripts/generate.py on OUT's latest checkpoint (generated text and serving timings; sampled at
temperature 0.7, top-p 0.9 by default).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate  # noqa: E402
import train  # noqa: E402
from lm_common import add_run_arguments, new_parser  # noqa: E402


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_run_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for metrics and checkpoints")
    parser.add_argument("--resume", default=None, help="continue training from this run")
    parser.add_argument("--prompt", action="append", default=None, help="see generate.py")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="0 = greedy (a model trained for minutes repeats itself greedily)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="generation report as JSON")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common = [args.config] + [item for value in args.set for item in ("--set", value)]
    if args.expert_parallel is not None:
        common += ["--expert-parallel", str(args.expert_parallel)]
    if args.mode is not None:
        common += ["--mode", args.mode]
    train_argv = common + ["--out", args.out] + (["--resume", args.resume] if args.resume else [])
    trained = train.main(train_argv)
    generate_argv = common + ["--checkpoint", args.out, "--max-new-tokens",
                              str(args.max_new_tokens), "--temperature", str(args.temperature),
                              "--top-p", str(args.top_p), "--seed", str(args.seed)]
    for prompt in args.prompt or []:
        generate_argv += ["--prompt", prompt]
    if args.json:
        generate_argv.append("--json")
    generated = generate.main(generate_argv)
    return {"train": trained, "generate": generated}


if __name__ == "__main__":
    main()
