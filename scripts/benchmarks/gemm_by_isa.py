#!/usr/bin/env python
"""Which bfloat16 GEMM is faster on this CPU: oneDNN's bfloat16 GEMM or its float32 GEMM (the
converted path's core), at every instruction set oneDNN may use here, and what the library picks.

    python scripts/benchmarks/gemm_by_isa.py [--quick] [--out DIR]

oneDNN's own dispatch is capped with its documented ONEDNN_MAX_CPU_ISA (AVX2, AVX512_CORE,
AVX512_CORE_BF16, AVX512_CORE_AMX), one fresh process per cap, so one machine stands in for the
CPU kinds below it: AVX512_CORE is an AVX-512 CPU without bfloat16 arithmetic, AVX512_CORE_BF16
one with AVX512-BF16 and no AMX. Each process times single-threaded size^3 GEMMs (float32 and
bfloat16 inputs, float32 output) and reports ``bfloat16_gemm()``, the library's automatic choice
(mindspore_moe_ep/ops/kernel_library.py; a rule of oneDNN's effective instruction set in
gemm_backend.cc: direct exactly with AMX).
"""
import json
import os
import subprocess
import sys

import bench_common as bc

NAME = "gemm_by_isa"
ONEDNN_CAPS = ("AVX2", "AVX512_CORE", "AVX512_CORE_BF16", "AVX512_CORE_AMX")

WORKER = """
import json, sys
sys.path.insert(0, {here!r})
import expert_compute as ec
from mindspore_moe_ep.ops import bfloat16_gemm
library = ec.onednn()
row = {{"choice": bfloat16_gemm()}}
for size in {sizes!r}:
    float32_s = ec.gemm_direct(library, size, False, {repeats})
    bfloat16_s = ec.gemm_direct(library, size, True, {repeats})
    row[str(size)] = [2 * size ** 3 / float32_s / 1e9, 2 * size ** 3 / bfloat16_s / 1e9]
print(json.dumps(row))
"""


def main(argv=None):
    args = bc.argument_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    sizes, repeats = ((512,), 2) if args.quick else ((512, 1024), 3)
    info = bc.machine_info()
    print(f"[{NAME}] {bc.describe_machine(info)}", flush=True)
    rows, results = [], {}
    for cap in ONEDNN_CAPS:
        if cap == "AVX2" and not args.quick:
            sizes_here = (256,)  # oneDNN's bfloat16 reference loop is very slow: one small size
        else:
            sizes_here = sizes
        script = WORKER.format(here=bc.HERE, sizes=sizes_here, repeats=repeats)
        completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                   env=dict(os.environ, ONEDNN_MAX_CPU_ISA=cap, GLOG_v="3"))
        if completed.returncode != 0:
            print(f"[{NAME}] {cap}: failed\n{completed.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        results[cap] = row
        for size in sizes_here:
            float32_gflops, bfloat16_gflops = row[str(size)]
            rows.append([cap, size, float32_gflops, bfloat16_gflops,
                         bfloat16_gflops / float32_gflops, row["choice"]])
        print(f"[{NAME}] {cap} done", flush=True)
    print(bc.table(["oneDNN ISA cap", "size", "float32 GFLOP/s", "bfloat16 GFLOP/s",
                    "bf16 / f32", "library picks"], rows))
    bc.write_results(args.out, NAME, {"machine": info, "sizes": list(sizes), "results": results})


if __name__ == "__main__":
    main()
