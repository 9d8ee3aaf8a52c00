"""The dry run's request estimate (plan.cost) for a dense layer of about a petabyte on an object store.

    python benchmarks/price_petabyte.py [--size 131072x131072x65536] [--dtype uint8] [--budget 2G]
                                        [--coarsest-mag 8-8-4]

Writes only the properties and an empty mag-1 array (reference layout, fill value 1 so that
the plan is dense: every unit counts as holding data) in a temporary directory, plans the run
as if that directory were a bucket (the planning's remote rules: units grown z, then y first,
two fetched boxes in the budget), and prints the estimate per pass plus the totals priced at
example rates. No data is written or read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from unittest import mock

from beam_downsample import demo
from beam_downsample.plan import cost, plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.core.mags import parse_mag
from beam_downsample.store import arrays, prefetch
from beam_downsample.store.properties import load_dataset

# Example list prices (GCS Standard, per 1,000 operations): writes and lists are class A, reads class B,
# deletes are free. Check your provider's current price list.
CLASS_A_PER_1000 = 0.005
CLASS_B_PER_1000 = 0.0004


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="131072x131072x65536")
    parser.add_argument("--dtype", default="uint8")
    parser.add_argument("--budget", default="2G")
    parser.add_argument("--coarsest-mag", default="8-8-4")
    options = parser.parse_args()
    size = [int(v) for v in options.size.split("x")]
    budget = int(options.budget[:-1]) << {"M": 20, "G": 30}[options.budget[-1]]
    root = tempfile.mkdtemp(prefix="price-")
    try:
        category = "segmentation" if options.dtype.startswith("uint32") else "color"
        layer = demo.layer_properties("layer", category, options.dtype, (0, 0, 0), size, [(1, 1, 1)], 1,
                                      1 if category == "segmentation" else None, "zarr3")
        demo._write_header(root, "petabyte", (11.24, 11.24, 28.0), [layer], "zarr3")  # pylint: disable=protected-access
        (layer_,) = load_dataset(root).layers
        spec = arrays.new_mag_spec(layer_, root, (1, 1, 1))
        spec["metadata"]["fill_value"] = 1  # a dense plan without writing any data
        arrays.create_mag(spec, resume=False)
        with open(os.path.join(root, "layer", "1", "zarr.json"), encoding="utf-8") as handle:
            assert json.load(handle)["fill_value"] == 1
        with mock.patch.object(prefetch, "is_remote", lambda spec: True):
            plans = plan_job(load_dataset(root), JobOptions(jobs=1, memory_budget=budget,
                                                            coarsest_mag=parse_mag(options.coarsest_mag)))
            estimates = cost.estimate(plans)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    voxels = size[0] * size[1] * size[2]
    print(f"{options.size} {options.dtype} ({voxels:.2e} voxels), --memory-budget {options.budget}, "
          f"--coarsest-mag {options.coarsest_mag}")
    for plan in plans:
        for index, grid in enumerate(plan.grids):
            print(f"pass {index + 1}: units of {'x'.join(map(str, grid.shape))} source voxels, "
                  f"fetched in boxes of {plan.configs[index].prefetch_bytes / (1 << 20):.0f} MiB")
    print("| pass | work units | reads | writes | lists | deletes | total |")
    print("|---|---|---|---|---|---|---|")
    totals = dict.fromkeys(cost.KINDS, 0)
    for index, counts in enumerate(estimates):
        for kind in cost.KINDS:
            totals[kind] += counts[kind]
        print(f"| {index + 1} | {counts['units']:,} | " + " | ".join(f"{counts[k]:,}" for k in cost.KINDS)
              + f" | {sum(counts[k] for k in cost.KINDS):,} |")
    print("| all | | " + " | ".join(f"{totals[k]:,}" for k in cost.KINDS) + f" | {sum(totals.values()):,} |")
    price = (totals["writes"] + totals["lists"]) / 1000 * CLASS_A_PER_1000 + totals["reads"] / 1000 * CLASS_B_PER_1000
    print(f"\nat ${CLASS_A_PER_1000} per 1,000 class A (writes, lists) and ${CLASS_B_PER_1000} per 1,000 "
          f"class B (reads) operations: ${price:,.2f}")


if __name__ == "__main__":
    main()
