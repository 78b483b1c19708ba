"""The kernels' parallel loop (custom_ops/cpu/parallel_for.*): a pool of long-lived threads that
share each loop in chunks. What must hold whatever the timing:

- results equal a single-threaded float32 reference bit for bit, with more kernel threads than
  cores (chunks then land on threads in a different order on every run);
- several threads calling kernels at once (MindSpore may launch kernels concurrently) each get
  their own correct result;
- a process forked after the pool started (msrun / multiprocessing) computes correct results and
  does not wait for the parent's pool threads, which do not exist in the child.

The kernel is called through its AOT entry point (tests/kernel_abi.py), so no MindSpore runtime is
involved (a forked child must not touch the parent's MindSpore threads either).
"""
import os
import subprocess
import sys
import textwrap

from mindspore_moe_ep.ops.kernel_library import library_path

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

CHILD_SCRIPT = textwrap.dedent(r"""
    import ctypes, os, sys, threading, time
    import numpy as np
    from kernel_abi import call_kernel

    library = ctypes.CDLL(sys.argv[1])

    def call_combine(rows, positions, weights):
        y = np.empty((positions.shape[0], rows.shape[1]), np.float32)
        assert call_kernel(library, "MoeEpCombine", rows, positions, weights, y) == 0
        return y

    # Large enough for every thread to get several chunks: y is 16 MiB.
    rng = np.random.default_rng(3)
    tokens, top_k, hidden = 2048, 4, 2051
    rows = rng.standard_normal((tokens * top_k, hidden), dtype=np.float32)
    positions = rng.permutation(tokens * top_k).astype(np.int32).reshape(tokens, top_k)
    positions[::7, 1] = -1  # some absent slots
    weights = rng.random((tokens, top_k), dtype=np.float32)
    # The kernels' arithmetic in float32: sum = sum + w * row, k in order, no fused multiply-add.
    expected = np.zeros((tokens, hidden), np.float32)
    for k in range(top_k):
        present = positions[:, k] >= 0
        expected[present] += weights[present, k:k + 1] * rows[positions[present, k]]

    def check(label):
        if not np.array_equal(call_combine(rows, positions, weights), expected):
            print(f"{label}: differs from the float32 reference", flush=True)
            os._exit(1)

    for repeat in range(3):
        check(f"call {repeat}")

    failures = []
    def concurrent_caller(index):
        try:
            for _ in range(3):
                check(f"thread {index}")
        except BaseException as error:
            failures.append(error)
    callers = [threading.Thread(target=concurrent_caller, args=(i,)) for i in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert not failures, failures

    child = os.fork()
    if child == 0:
        check("forked child")
        os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        finished, status = os.waitpid(child, os.WNOHANG)
        if finished:
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        print("the forked child hung in the parallel loop", flush=True)
        os._exit(1)
    if os.waitstatus_to_exitcode(status) != 0:
        print("the forked child failed", flush=True)
        os._exit(1)
    print("ok", flush=True)
""")


def test_parallel_kernels_are_exact_concurrent_and_fork_safe(tmp_path):
    script = tmp_path / "parallel_child.py"
    script.write_text(CHILD_SCRIPT)
    # 5 kernel threads on a 2-core machine: 4 pool threads, so chunks are claimed out of order.
    environment = dict(os.environ, MOE_EP_NUM_THREADS="5",
                       PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script), library_path()], env=environment,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}")
