"""Helper for the tests that results do not depend on the kernels' thread count."""
import os
import subprocess
import sys

import numpy as np


def assert_same_bits_for_thread_counts(script, tmp_path, thread_counts):
    """Runs ``python -c script OUT.npz`` once per MOE_EP_NUM_THREADS value (read once per
    process, hence a process each) and asserts that every array saved is bitwise the same."""
    outputs = []
    for threads in thread_counts:
        path = tmp_path / f"threads_{threads}.npz"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True,
                       env=dict(os.environ, MOE_EP_NUM_THREADS=str(threads), GLOG_v="3"))
        outputs.append(np.load(path))
    for other in outputs[1:]:
        assert set(other) == set(outputs[0])
        for name in outputs[0]:
            np.testing.assert_array_equal(other[name], outputs[0][name], err_msg=name)
