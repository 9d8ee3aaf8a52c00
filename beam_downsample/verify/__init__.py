"""`beam-downsample verify`: checks a mag pyramid without writing to it.

`verify(target, ...)` returns a `VerifyResult` whose findings name the layer, the
mag and the box of every problem; the command line (`launch.verify_cli`) prints
them and exits 0 or 1.
"""

from beam_downsample.verify.check import DEFAULT_SAMPLE, VerifyUsageError, verify
from beam_downsample.verify.result import Finding, Sample, VerifyResult

__all__ = ["DEFAULT_SAMPLE", "Finding", "Sample", "VerifyResult", "VerifyUsageError", "verify"]
