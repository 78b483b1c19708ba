"""What a distributed test worker records: named checks and measured values for the launcher."""
import time
import traceback

import numpy as np

from mindspore_moe_ep.ops.kernel_library import explain_kernel_errors


class CheckReport:
    """Collects (mode/case, ok, detail) entries and measured values; set ``mode`` per pass."""

    def __init__(self, mode="pynative"):
        self.mode = mode
        self.checks = []
        self.values = {}

    def check(self, case, ok, detail=""):
        self.checks.append([f"{self.mode}/{case}", bool(ok), str(detail)[:2000]])

    def equal(self, case, actual, expected):
        """Bitwise (exact) equality of arrays, shapes included."""
        actual, expected = np.asarray(actual), np.asarray(expected)
        if actual.shape != expected.shape:
            self.check(case, False, f"shape {actual.shape} != {expected.shape}")
            return
        mismatch = np.argwhere(actual != expected)
        detail = "" if mismatch.size == 0 else (
            f"{len(mismatch)} mismatches; first at {mismatch[0].tolist()}: "
            f"{actual[tuple(mismatch[0])]} != {expected[tuple(mismatch[0])]}")
        self.check(case, mismatch.size == 0, detail)

    def close(self, case, actual, expected, rel_tol, kind):
        """max|a - e| <= rel_tol * max|e|; the scaled error is kept as max_error/<kind>."""
        actual = np.asarray(actual, np.float64)
        expected = np.asarray(expected, np.float64)
        if actual.shape != expected.shape:
            self.check(case, False, f"shape {actual.shape} != {expected.shape}")
            return
        scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
        error = float(np.abs(actual - expected).max(initial=0.0)) / scale
        key = f"max_error/{kind}"
        self.values[key] = max(self.values.get(key, 0.0), error)
        self.check(case, error <= rel_tol, f"scaled error {error:.3g} > {rel_tol:g}")

    def run(self, case, body):
        """Runs one case; an exception is recorded as a failed check."""
        started = time.monotonic()
        try:
            with explain_kernel_errors():
                body()
        except Exception:  # recorded, so that the other cases still run
            self.check(case, False, traceback.format_exc()[-2000:])
        key = f"seconds/{self.mode}/{case}"
        self.values[key] = round(self.values.get(key, 0.0) + time.monotonic() - started, 3)


def drain_pending_errors():
    """Lets the kernels queued by a failed PYNATIVE step finish (they may fail too), so that
    their errors do not surface at the next synchronisation, in another case."""
    import mindspore as ms
    from mindspore_moe_ep.ops.kernel_library import take_kernel_errors
    for _ in range(3):
        try:
            ms.runtime.synchronize()
            break
        except Exception:  # a pending failure of the step that already failed
            continue
    take_kernel_errors()


def timed_call(body):
    """(body()'s result or None, error text or None, seconds): for cases that must fail."""
    started = time.monotonic()
    try:
        with explain_kernel_errors():
            result = body()
        return result, None, round(time.monotonic() - started, 3)
    except Exception as error:  # the message is what the test checks
        text = f"{type(error).__name__}: {error}"
        drain_pending_errors()
        return None, text, round(time.monotonic() - started, 3)
