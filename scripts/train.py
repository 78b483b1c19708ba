#!/usr/bin/env python
"""Train the MoE language model of a YAML config on the byte-level corpus (the Python standard
library's sources, see mindspore_moe_ep/training/corpus.py), with checkpoints.

One process (EP 1)::

    python scripts/train.py yaml_configs/lm_tiny.yaml --out runs/tiny

Under msrun (DP x EP; --expert-parallel defaults to the worker count), see scripts/msrun_lm.sh::

    scripts/msrun_lm.sh yaml_configs/lm_deepseek_v3_mini_4cpu.yaml --workers 4 --out runs/mini

Prints one line per logged step (loss, validation loss when computed, learning rate, gradient
norm, tokens/s, per-MoE-layer expert load max/mean and dropped tokens) and writes the same to
``OUT/metrics.jsonl``, one JSON object per logged step, and each MoE layer's expert-load window
since the previous logged step (``layer.load_stats()``, training forwards only) to
``OUT/expert_load.jsonl``, ``{"step": N, "layers": [stats, ...]}`` per logged step (plot it with
scripts/plot_expert_load.py). Checkpoints go to ``OUT/step_NNNNNN``
every ``train.checkpoint_every`` steps and at the end; ``--resume DIR`` continues from DIR's
latest checkpoint (bit-exactly at the same EP size; at another, the experts are resharded).
"""
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_common import add_run_arguments, new_parser, shard_rows, start_run  # noqa: E402

PREFIX = "train"


def parse_args(argv=None):
    parser = new_parser(__doc__)
    add_run_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for metrics and checkpoints")
    parser.add_argument("--resume", default=None,
                        help="continue from this run directory's latest checkpoint (or a "
                             "step_NNNNNN directory)")
    return parser.parse_args(argv)


def expert_load(model, world_size):
    """Per MoE layer: (max/mean of the experts' load over all ranks' tokens, dropped pairs)."""
    from mindspore_moe_ep.comm.window import world_all_gather
    layers = model.moe_layers()
    local = np.concatenate([np.append(layer.stats()["routed_per_expert"],
                                      layer.stats()["num_dropped"]) for layer in layers])
    totals = world_all_gather(local).sum(axis=0) if world_size > 1 else local
    result = []
    for load in np.split(totals, len(layers)):
        counts = load[:-1].astype(np.float64)
        result.append((float(counts.max() / counts.mean()) if counts.sum() else 1.0,
                       int(load[-1])))
    return result


def format_record(record, steps):
    """One progress line."""
    parts = [f"step {record['step']:5d}/{steps}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    parts += [f"lr {record['learning_rate']:.2e}", f"|g| {record['grad_norm']:.3f}",
              f"tok/s {record['tokens_per_s']:8.0f}",
              "load max/mean " + " ".join(f"{v:.2f}" for v in record["load_max_over_mean"]),
              f"dropped {sum(record['dropped_tokens'])}"]
    return "  ".join(parts)


def window_load_record(model, step):
    """{"step", "layers": [each MoE layer's load_stats() as JSON]} (a collective), then empties
    the windows."""
    from mindspore_moe_ep.load_balancing import load_stats_to_json
    layers = [load_stats_to_json(layer.load_stats()) for layer in model.moe_layers()]
    reset_load_windows(model)
    return {"step": step, "layers": layers}


def reset_load_windows(model):
    for layer in model.moe_layers():
        layer.reset_load_stats()


def metrics_file(out_dir, start_step, rank, name="metrics.jsonl"):
    """OUT/<name> (JSON lines with a "step") for appending (rank 0), keeping only records up to
    ``start_step``."""
    if rank != 0:
        return None
    path = os.path.join(out_dir, name)
    kept = []
    if start_step and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            kept = [line for line in handle if json.loads(line)["step"] <= start_step]
    handle = open(path, "w", encoding="utf-8")
    handle.writelines(kept)
    return handle


def main(argv=None):
    args = parse_args(argv)
    run = start_run(args)
    config, rank, world_size = run.config, run.rank, run.world_size
    train = config.train

    import mindspore as ms
    from mindspore import Tensor
    from mindspore_moe_ep.models import MoETransformerLM
    from mindspore_moe_ep.models.checkpoint import CheckpointError, load_checkpoint, \
        save_checkpoint
    from mindspore_moe_ep.training import (TrainStep, learning_rate, load_corpus,
                                           training_batch, update_expert_biases,
                                           validation_batch)

    tokens_per_rank = train.global_batch_size // world_size * train.seq_len
    if tokens_per_rank > config.dispatch.max_tokens_per_rank:
        raise SystemExit(f"error: train.global_batch_size / world size * train.seq_len = "
                         f"{tokens_per_rank} tokens per rank exceed "
                         f"dispatch.max_tokens_per_rank = {config.dispatch.max_tokens_per_rank}")
    if (train.eval_sequences // world_size) % (train.global_batch_size // world_size):
        raise SystemExit(f"error: train.eval_sequences = {train.eval_sequences} is not a multiple "
                         f"of train.global_batch_size = {train.global_batch_size}; validation "
                         f"runs in chunks of a training step's sequences")
    train_data, validation_data = load_corpus()
    validation = shard_rows(validation_batch(validation_data, train.eval_sequences,
                                             train.seq_len), rank, world_size,
                            "train.eval_sequences")
    model = MoETransformerLM(config)
    model.set_train(True)
    step_cell = TrainStep(model, train)
    run.log(f"{args.config}: {describe_model(model, config)}; EP {config.parallel.expert_parallel}"
            f" x DP {world_size // config.parallel.expert_parallel}, {config.runtime.mode} mode; "
            f"corpus {train_data.size / 1e6:.1f} MB train / {validation_data.size / 1e6:.2f} MB "
            f"validation bytes", PREFIX)

    start_step = 0
    if args.resume:
        try:
            meta = load_checkpoint(args.resume, model, step_cell.optimizer, config)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        start_step = meta["step"]
        run.log(f"resumed from {args.resume} at step {start_step} (saved at EP "
                f"{meta['expert_parallel']})", PREFIX)
    os.makedirs(args.out, exist_ok=True)
    metrics = metrics_file(args.out, start_step, rank)
    load_file = metrics_file(args.out, start_step, rank, "expert_load.jsonl")

    def evaluate():
        """Mean validation loss over all ranks, in chunks of a training step's sequences."""
        model.set_train(False)
        chunk = train.global_batch_size // world_size
        losses = [step_cell.loss_net(Tensor(validation[start:start + chunk, :-1]),
                                     Tensor(validation[start:start + chunk, 1:]))
                  for start in range(0, len(validation), chunk)]
        model.set_train(True)
        return float(step_cell.mean_over_ranks(sum(losses) / len(losses)).asnumpy())

    losses = {}
    record = {}
    for step in range(start_step, train.steps):
        batch = shard_rows(training_batch(train_data, config.runtime.seed, step,
                                          train.global_batch_size, train.seq_len),
                           rank, world_size, "train.global_batch_size")
        rate = learning_rate(step, train)
        started = time.perf_counter()
        _, loss, norm = step_cell(Tensor(batch[:, :-1]), Tensor(batch[:, 1:]),
                                  Tensor(rate, ms.float32))
        update_expert_biases(model)
        loss = float(loss.asnumpy())
        elapsed = time.perf_counter() - started
        done = step + 1
        losses[done] = loss
        if not math.isfinite(loss):
            raise SystemExit(f"error: the loss is {loss} at step {done}; lower "
                             f"train.max_learning_rate")
        interval = config.parallel.rebalance_interval
        if interval and config.parallel.expert_parallel > 1 and done % interval == 0 \
                and done < train.steps:
            # Each layer plans from its load window (since the last log or rebalance) and
            # starts a new one; the AdamW moments move with the weights (a replica gets its
            # source's), and the gradient reducer sums each expert's replicas.
            started = time.perf_counter()
            for layer in model.moe_layers():
                layer.rebalance(optimizer=step_cell.optimizer)
            run.log(f"step {done}: experts rebalanced in {time.perf_counter() - started:.2f} s",
                    PREFIX)
        evaluate_now = done % train.eval_every == 0 or done == train.steps
        if done % train.log_every == 0 or evaluate_now or done == start_step + 1:
            loads = expert_load(model, world_size)
            record = {"step": done, "loss": loss, "learning_rate": rate,
                      "grad_norm": float(norm.asnumpy()), "step_s": elapsed,
                      "tokens_per_s": train.global_batch_size * train.seq_len / elapsed,
                      "load_max_over_mean": [load for load, _ in loads],
                      "dropped_tokens": [dropped for _, dropped in loads]}
            load_record = window_load_record(model, done)
            if evaluate_now:
                record["val_loss"] = evaluate()
                reset_load_windows(model)   # the windows count training forwards only
            if load_file:
                load_file.write(json.dumps(load_record) + "\n")
                load_file.flush()
            run.log(format_record(record, train.steps), PREFIX)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
        if done == train.steps or (train.checkpoint_every and done % train.checkpoint_every == 0):
            extra = {"data": {"corpus": "python-stdlib-bytes", "seed": config.runtime.seed,
                              "next_step": done, "global_batch_size": train.global_batch_size,
                              "seq_len": train.seq_len},
                     "last_record": record}
            path = save_checkpoint(args.out, done, model, step_cell.optimizer, config, extra)
            run.log(f"checkpoint {path}", PREFIX)
    for handle in (metrics, load_file):
        if handle:
            handle.close()
    if "val_loss" in record:
        run.log(f"final validation loss {record['val_loss']:.4f} nats/byte after {train.steps} "
                f"steps (a uniform guess: ln 256 = {math.log(256):.3f})", PREFIX)
    return {"losses": losses, "last_record": record, "rank": rank}


def describe_model(model, config):
    """'N M parameters (A M active per token), L layers (D dense), E experts top-k'."""
    total = active = 0
    per_token = config.router.top_k / config.model.num_experts
    moe_experts = {id(param) for layer in model.moe_layers()
                   for param in layer.experts.get_parameters()}
    for param in model.trainable_params():
        size = param.size * (config.parallel.expert_parallel if id(param) in moe_experts else 1)
        total += size
        active += size * per_token if id(param) in moe_experts else size
    lm = config.lm
    return (f"{total / 1e6:.1f} M parameters ({active / 1e6:.1f} M active per token), "
            f"{lm.num_layers} layers ({lm.dense_layers} dense), {config.model.num_experts} "
            f"experts top-{config.router.top_k}, hidden {config.model.hidden_size}")


if __name__ == "__main__":
    main()
