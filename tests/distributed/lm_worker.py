"""msrun worker for tests/test_lm_distributed.py: the language-model scripts under EP > 1.

Runs scripts/train.py and scripts/generate.py through their ``main(argv)`` several times in one
launch (msrun's start-up costs ~20 s), each as a user would run them under msrun, and reports
what they returned. ``plan`` (argv[1]) is one of:

- ``ep2`` (2 workers, PyNative): train EP 2 for 40 steps with checkpoints at 20 and 40; resume
  from step 20 into another directory; in GRAPH_MODE, 4 steps without and with the experts
  relocated every 2 steps; generate from the final checkpoint (greedy and sampled).
- ``ep4`` (4 workers, PyNative unless stated): train EP 4 for 4 steps, again with the
  experts rebalanced every 2 steps (parallel.rebalance_interval), and again with one redundant
  expert slot per rank as well; generate from the first
  checkpoint at EP 4 (PyNative and GRAPH_MODE), EP 2 (x DP 2) and EP 1 (x DP 4): the experts
  resharded; at EP 4 with one redundant expert slot per rank, rebalanced every 3 decode steps;
  sampled at EP 4; then two bad inputs that every rank must refuse (an empty prompt, a
  checkpoint of another config). (GRAPH_MODE at EP 1 is in test_lm.py; each GRAPH_MODE
  generation here costs ~10 s of compilation on 4 workers sharing 2 cores.)
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed.launch import worker_rank, write_result  # noqa: E402
from lm_scripts import generate, train  # noqa: E402

GENERATE = ("--max-new-tokens", "8", "--json", "--with-logits", "--no-warmup")


def refused(function, *argv):
    """The message of the SystemExit that ``function(*argv)`` raised, or None."""
    try:
        function(*argv)
    except SystemExit as error:
        return str(error)
    return None


def generations(summary):
    return {"tokens": [prompt["tokens"] for prompt in summary["prompts"]],
            "first_logits": [prompt["first_logits"] for prompt in summary["prompts"]],
            "paths": summary["paths"], "timings": summary["timings"]}


def plan_ep2(work):
    run, resumed = os.path.join(work, "run"), os.path.join(work, "resumed")
    trained = train("--out", run, "--set", "train.log_every=1")
    resumed_losses = train("--out", resumed, "--resume", os.path.join(run, "step_000020"),
                           "--set", "train.log_every=1")["losses"]
    graph = {}
    for interval in ("0", "2"):  # GRAPH_MODE training, without and with relocation every 2 steps
        out = os.path.join(work, f"graph_rebalance_{interval}")
        graph[interval] = train("--out", out, "--mode", "graph", "--set", "train.steps=4",
                                "--set", "train.log_every=1", "--set",
                                f"parallel.rebalance_interval={interval}")["losses"]
        with open(os.path.join(out, "expert_load.jsonl"), encoding="utf-8") as records:
            graph[f"slots_{interval}"] = [[layer["slot_experts"] for layer in
                                           json.loads(line)["layers"]] for line in records]
    greedy = generate("--checkpoint", run, *GENERATE)
    sampled = generate("--checkpoint", run, "--temperature", "0.8", "--top-p", "0.95", *GENERATE)
    return {"losses": trained["losses"], "resumed_losses": resumed_losses, "graph": graph,
            "greedy": generations(greedy), "sampled": generations(sampled)}


def plan_ep4(work):
    run, rebalanced = os.path.join(work, "run"), os.path.join(work, "rebalanced")
    report = {"losses": train("--out", run, "--set", "train.steps=4")["losses"],
              "rebalanced_losses": train("--out", rebalanced, "--set", "train.steps=4",
                                         "--set", "parallel.rebalance_interval=2")["losses"],
              "replicas_losses": train("--out", os.path.join(work, "replicas"), "--set",
                                       "train.steps=4", "--set", "parallel.redundant_experts=4",
                                       "--set", "parallel.rebalance_interval=2")["losses"]}
    for name, argv in [("ep4_pynative", ["--mode", "pynative"]),
                       ("ep4_graph", ["--mode", "graph"]),
                       ("ep2_pynative", ["--mode", "pynative", "--expert-parallel", "2"]),
                       ("ep1_pynative", ["--mode", "pynative", "--expert-parallel", "1"])]:
        report[name] = generations(generate("--checkpoint", run, *argv, *GENERATE))
    report["ep4_from_rebalanced"] = generations(generate(
        "--checkpoint", rebalanced, "--mode", "pynative", *GENERATE))
    report["ep4_replicas_rebalanced"] = generations(generate(
        "--checkpoint", run, "--mode", "pynative", "--set", "parallel.redundant_experts=4",
        "--set", "parallel.rebalance_interval=3", *GENERATE))
    report["sampled_ep4"] = generations(generate("--checkpoint", run, "--mode", "pynative",
                                                 "--temperature", "0.8", *GENERATE))
    report["empty_prompt"] = refused(generate, "--checkpoint", run, "--prompt", "")
    report["other_config"] = refused(generate, "--checkpoint", run, "--set", "lm.num_heads=8",
                                     "--mode", "pynative")
    return report


def main():
    plan, work = sys.argv[1], sys.argv[2]
    report = {"ep2": plan_ep2, "ep4": plan_ep4}[plan](work)
    report["rank"] = worker_rank()
    write_result(report)


if __name__ == "__main__":
    main()
