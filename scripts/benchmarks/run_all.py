#!/usr/bin/env python
"""Runs every benchmark (or some), one after the other, then writes the summary.

    python scripts/benchmarks/run_all.py [--only NAME ...] [--quick] [--out DIR]
                                         [--report docs/performance.md]

Each benchmark is a separate process (``python scripts/benchmarks/NAME.py``), so one that fails
does not stop the others; the run ends with the list of failures and a non-zero status if any.
Optional requirements (PyTorch, fairscale, matplotlib): scripts/benchmarks/requirements.txt.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["local_kernels", "prefill_exchange", "decode_latency", "prefill_memory",
              "expert_compute", "end_to_end", "bound_independence", "lm_decode",
              "quantized_dispatch", "load_balance"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None,
                        help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true", help="quick mode of every benchmark")
    parser.add_argument("--out", default="bench_results", help="directory for JSON and plots")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report", default=None,
                        help="also update this Markdown file's benchmarks section "
                             "(e.g. docs/performance.md)")
    args = parser.parse_args(argv)
    names = args.only or BENCHMARKS
    environment = dict(os.environ)
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment.get("PATH",
                                                                                         "")
    failures, started = [], time.monotonic()
    for index, name in enumerate(names, 1):
        print(f"[run_all] {index}/{len(names)} {name} "
              f"({time.monotonic() - started:.0f} s elapsed)", flush=True)
        command = [sys.executable, os.path.join(HERE, f"{name}.py"), "--out", args.out]
        command += ["--quick"] if args.quick else []
        command += ["--no-plot"] if args.no_plot else []
        begin = time.monotonic()
        status = subprocess.run(command, env=environment).returncode
        print(f"[run_all] {name}: {'ok' if status == 0 else f'FAILED (exit {status})'} in "
              f"{time.monotonic() - begin:.0f} s", flush=True)
        if status != 0:
            failures.append(name)
    report = [sys.executable, os.path.join(HERE, "report.py"), "--out", args.out]
    if args.report:
        report += ["--write", args.report]
    subprocess.run(report, env=environment)
    print(f"[run_all] done in {time.monotonic() - started:.0f} s; "
          f"{'failed: ' + ', '.join(failures) if failures else 'all succeeded'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
