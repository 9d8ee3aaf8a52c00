"""Beam transforms for your own pipelines (the package face; they live in `run.inline`).

    import apache_beam as beam
    import beam_downsample as bd

    with beam.Pipeline() as pipeline:
        written = pipeline | beam.Create(blocks) | beam.ParDo(WriteBlock(...))
        results = written | bd.beam.DownsamplePyramid("path/to/dataset", "segmentation")

See docs/library.md for what the transform does and what is left to the caller.
"""

from beam_downsample.run.inline import DownsamplePyramid, lock_layers

__all__ = ["DownsamplePyramid", "lock_layers"]
