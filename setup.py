"""Install the batch-growing trainer: `pip install -e .[test]`."""
import setuptools

setuptools.setup(
    name="grow-batch",
    version="0.1.0",
    description=(
        "Data-parallel JAX/Flax trainer that anneals SGD noise by growing the "
        "batch (Smith et al., ICLR 2018)."),
    python_requires=">=3.11",  # jax 0.10, flax and orbax need it
    packages=setuptools.find_packages(
        include=["trainer", "trainer.*", "models", "models.*",
                 "input_pipeline", "input_pipeline.*", "configs", "configs.*"]),
    # Ranges that were installed together and tested on CPU (Python 3.11).
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<4.10",
        "ml-collections>=1.1,<1.2",
        "absl-py>=2.1,<3",
        "numpy>=2.0,<3",
        "tensorboardX>=2.6,<2.7",
        "matplotlib>=3.8,<4",
        "pillow>=10",
        # Resizing crops, and TFDS's image decoding (which uses it when present).
        "opencv-python-headless>=4.8,<6",
        "etils[epath]>=1.5",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "portpicker>=1.5"],
        # gs:// workdirs and data: epath's and tensorboardX's GCS backends.
        "gcs": ["gcsfs", "google-cloud-storage"],
    },
)
