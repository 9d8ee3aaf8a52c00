"""Planning: a dataset and options turned into passes, unit grids and pass configs.

Writes nothing. `plan_job` reads top to bottom: which layers (`layers`),
which mags (`pyramid`), in which passes (`passes`), in which work units
(`units`); `describe` says what the plan is, `refresh` cuts it to `--bbox`.
"""

from beam_downsample.plan.describe import describe, interrupted_refreshes, pass_sizes
from beam_downsample.plan.job import LayerPlan, each_pass, pass_units, plan_job
from beam_downsample.plan.options import JobOptions

__all__ = ["JobOptions", "LayerPlan", "describe", "each_pass", "interrupted_refreshes", "pass_sizes", "pass_units",
           "plan_job"]
