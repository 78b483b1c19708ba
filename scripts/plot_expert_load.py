#!/usr/bin/env python
"""Plot the expert load that scripts/train.py and scripts/generate.py save.

    python scripts/plot_expert_load.py runs/tiny/expert_load.jsonl --out load.png [--layer 0]
    python scripts/plot_expert_load.py load_stats.json --out load.png   # generate.py --load-stats

Input: JSON lines of ``{"step": N, "layers": [stats, ...]}`` (train.py, one record per logged
step, each covering the steps since the previous one) or one ``{"layers": [...]}`` object
(generate.py); ``stats`` is ``MoELayer.load_stats()`` as JSON. Draws, for one MoE layer, a heat
map of tokens per expert (rows) over the recorded steps (columns), the records' windows end to
end, and bars of each expert-parallel rank's tokens over all of them. Without matplotlib it says
so, writes the same data as CSV (``OUT.csv``: one row per step, one column per expert;
``OUT_ranks.csv``: tokens per rank) and exits 0.
"""
import argparse
import json
import os
import sys

import numpy as np


def read_records(path):
    """The records of a train.py JSON-lines file or a generate.py JSON file."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_series(records, layer):
    """(steps [S], tokens [S, E], rank tokens [R]) of MoE layer ``layer`` over all records.

    Step numbers count forwards: a record of train.py at step N with a window of S steps covers
    steps N - S + 1 .. N; records without "step" follow the previous one.
    """
    steps, tokens, ranks = [], [], None
    last_step = 0
    for index, record in enumerate(records):
        if not 0 <= layer < len(record["layers"]):
            raise ValueError(f"--layer {layer} is not allowed: record {index} has "
                             f"{len(record['layers'])} MoE layers")
        stats = record["layers"][layer]
        per_step = np.asarray(stats["tokens_per_expert_per_step"], np.int64).reshape(
            -1, len(stats["tokens_per_expert"]))                                    # [S, E]
        end = record.get("step", last_step + per_step.shape[0])
        steps.extend(range(end - per_step.shape[0] + 1, end + 1))
        tokens.append(per_step)
        rank_loads = np.asarray(stats["rank_loads"], np.int64)                     # [R]
        ranks = rank_loads if ranks is None else ranks + rank_loads
        last_step = end
    if ranks is None:
        raise ValueError("no records in the input")
    return np.asarray(steps, np.int64), np.concatenate(tokens), ranks


def write_csv(out, steps, tokens, ranks):
    """OUT.csv (step, expert_0, ...) and OUT_ranks.csv (rank, tokens); returns their paths."""
    stem = os.path.splitext(out)[0]
    heat_path, ranks_path = stem + ".csv", stem + "_ranks.csv"
    header = "step," + ",".join(f"expert_{e}" for e in range(tokens.shape[1]))
    np.savetxt(heat_path, np.column_stack([steps, tokens]), fmt="%d", delimiter=",",
               header=header, comments="")
    np.savetxt(ranks_path, np.column_stack([np.arange(ranks.size), ranks]), fmt="%d",
               delimiter=",", header="rank,tokens", comments="")
    return heat_path, ranks_path


def plot(out, steps, tokens, ranks, title):
    """The heat map and the rank bars in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (heat, bars) = plt.subplots(1, 2, figsize=(12, 5),
                                        gridspec_kw={"width_ratios": [3, 1]})
    image = heat.imshow(tokens.T, aspect="auto", origin="lower", cmap="viridis",
                        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, tokens.shape[1] - 0.5))
    heat.set_xlabel("step")
    heat.set_ylabel("expert")
    heat.set_title(title)
    figure.colorbar(image, ax=heat, label="tokens")
    bars.bar(np.arange(ranks.size), ranks)
    bars.set_xticks(np.arange(ranks.size))
    bars.axhline(ranks.mean(), color="black", linestyle="--", label="mean")
    bars.set_xlabel("expert-parallel rank")
    bars.set_ylabel("tokens")
    bars.set_title(f"max/mean {ranks.max() / max(ranks.mean(), 1e-30):.2f}")
    bars.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stats", help="expert_load.jsonl of train.py or --load-stats of "
                                      "generate.py")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--layer", type=int, default=0, help="which MoE layer (0 = the first)")
    args = parser.parse_args(argv)
    try:
        steps, tokens, ranks = load_series(read_records(args.stats), args.layer)
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"error: {args.stats}: {error}") from None
    summary = (f"MoE layer {args.layer}: {len(steps)} steps, {tokens.shape[1]} experts; rank "
               f"tokens {ranks.tolist()} (max/mean {ranks.max() / max(ranks.mean(), 1e-30):.3f})")
    print(summary)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        paths = write_csv(args.out, steps, tokens, ranks)
        print(f"matplotlib is not installed (pip install matplotlib): no PNG; wrote the data as "
              f"CSV to {paths[0]} and {paths[1]}")
        return 0
    plot(args.out, steps, tokens, ranks, f"{os.path.basename(args.stats)}: MoE layer "
                                         f"{args.layer}, tokens per expert")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
