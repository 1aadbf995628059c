"""unclip_jax: unCLIP (DALL-E 2) in JAX/Flax."""
import pathlib
import re

from setuptools import find_packages, setup

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(r'__version__ = "([^"]+)"', (_HERE / "unclip_jax" / "__init__.py").read_text()).group(1)

setup(
    name="unclip_jax",
    version=_VERSION,
    description="A JAX/Flax, TPU-native reimplementation of OpenAI's unCLIP (DALL-E 2).",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The top-level configs/ folder is installed as the subpackage unclip_jax.configs (built-in configs).
    packages=find_packages(include=["unclip_jax", "unclip_jax.*"]) + ["unclip_jax.configs"],
    package_dir={"unclip_jax.configs": "configs"},
    package_data={"unclip_jax": ["assets/*", "assets/**/*"]},
    install_requires=[
        # Ranges we support; requirements/constraints.txt pins the tested combination.
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "ml_collections>=1.1.0",
        "transformers>=5.6,<6",
        "safetensors>=0.4",
        "numpy>=2.0",
        "pillow>=10",
        "tqdm>=4.60",
        "absl-py>=2.0",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # `python -m unclip_jax.eval`: scipy for the matrix square root (jax already requires it), torch to read
        # pytorch-fid's .pth Inception weights with weights_only=True (a .safetensors copy needs no torch).
        "eval": ["scipy>=1.10", "torch>=2.1"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "transformers>=5.6,<6",
            "diffusers==0.42.1",
            "safetensors>=0.4",
            # tests/test_gcs.py: gs:// through etils.epath (gcsfs) against a local GCS emulator.
            "gcsfs>=2024.2",
            "gcp-storage-emulator>=2024.8",
        ],
        # `python -m unclip_jax.demo`, the web demo.
        "demo": ["gradio>=6.0,<7"],
        # The TPU compiler (the runtime that `jax[tpu]==0.10.2` pulls): compile-only TPU preflight on any host
        # (`--compile_only --topology v5p:2x2x1`) and tests/test_tpu_compile.py. A TPU VM gets it from jax[tpu].
        "tpu": ["libtpu==0.0.42.1"],
        # Its browser test (tests/test_demo.py): Playwright drives the system Chromium (apt-get install chromium).
        "demo-test": ["gradio>=6.0,<7", "playwright>=1.40"],
    },
)
