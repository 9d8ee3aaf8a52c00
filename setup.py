from setuptools import find_packages, setup

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
        "google-cloud-storage>=2.10",
        "absl-py>=1.4",
        "tqdm>=4.60",
        "crackle-codec>=0.30",
        "wkw>=1.1.24",
    ],
    extras_require={
        "test": ["pytest>=7", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["beam-downsample=beam_downsample.launch.cli:run"]},
)
