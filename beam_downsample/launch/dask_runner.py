"""Beam's DaskRunner, closing the dask client it opens for each pipeline.

Imported only for the dask strategies: the DaskRunner module needs dask.
"""

from __future__ import annotations

from apache_beam.runners.dask.dask_runner import DaskRunner, DaskRunnerResult


class ClientClosingResult(DaskRunnerResult):
    """Closes the pass's client when the pass ends, also when it fails or is interrupted."""

    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            self.client.close()


class ClosingDaskRunner(DaskRunner):
    """DaskRunner whose run_pipeline leaves no client behind (one pipeline per pass)."""

    def run_pipeline(self, pipeline, options):
        result = super().run_pipeline(pipeline, options)
        return ClientClosingResult(result.client, result.futures)
