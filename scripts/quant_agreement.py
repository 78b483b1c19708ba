#!/usr/bin/env python
"""Greedy tokens of a trained MoE language model with int8 dispatch against the same model without.

    python scripts/quant_agreement.py [--checkpoint runs/mini] [--workers 4] [--new-tokens 32]

Runs ``scripts/generate.py`` under msrun twice on the checkpoint (the main job's run directory by
default), with ``dispatch.quant`` none and int8, on 16 prompts of 16-61 bytes from the corpus's
validation split, greedy, and prints one JSON object: the fraction of generated tokens that
agree position by position, the sequences that agree entirely, and each sequence's first
differing position (null where none).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY_ROOT = os.path.dirname(HERE)
sys.path.insert(0, REPOSITORY_ROOT)


def prompts(count=16):
    """16 prompts of 16, 19, ..., 61 bytes from the validation split (as lm_decode.py's)."""
    from mindspore_moe_ep.training import load_corpus
    _, validation = load_corpus()
    return [bytes(validation[i * 4000:i * 4000 + 16 + 3 * i].tolist()).decode("utf-8", "replace")
            for i in range(count)]


def generate(args, quant, texts):
    command = ["bash", os.path.join(HERE, "msrun_lm.sh"), args.config, "--workers",
               str(args.workers), "--script", "generate.py", "--", "--checkpoint",
               args.checkpoint, "--max-new-tokens", str(args.new_tokens), "--json",
               "--set", f"dispatch.quant={quant}"]
    for text in texts:
        command += ["--prompt", text]
    print(f"[quant_agreement] generating with dispatch.quant={quant}", file=sys.stderr, flush=True)
    result = subprocess.run(command, cwd=REPOSITORY_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"generate.py failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n"
                 f"{result.stderr[-3000:]}")
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="yaml_configs/lm_deepseek_v3_mini_4cpu.yaml")
    parser.add_argument("--checkpoint", default="runs/mini")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    texts = prompts()
    runs = {quant: generate(args, quant, texts) for quant in ("none", "int8")}
    assert all(runs["int8"]["paths"][phase]["quantized"] for phase in ("prefill", "decode"))
    reference = [p["tokens"] for p in runs["none"]["prompts"]]
    quantized = [p["tokens"] for p in runs["int8"]["prompts"]]
    agree = sum(a == b for ref, q in zip(reference, quantized) for a, b in zip(ref, q))
    total = sum(len(ref) for ref in reference)
    print(json.dumps({
        "checkpoint": args.checkpoint, "checkpoint_step": runs["none"]["checkpoint_step"],
        "expert_parallel": runs["none"]["expert_parallel"], "new_tokens": args.new_tokens,
        "token_agreement": agree / total, "tokens": total,
        "sequences_identical": sum(ref == q for ref, q in zip(reference, quantized)),
        "sequences": len(reference),
        "first_difference": [next((i for i, (a, b) in enumerate(zip(ref, q)) if a != b), None)
                             for ref, q in zip(reference, quantized)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
