"""mmtoken: compress and control the visual tokens of multimodal LLMs in Hugging Face transformers."""

from setuptools import setup

setup(
    name="mmtoken",
    version="0.1.0",
    description="Hook-based visual-token compression plugins and benchmarks for multimodal LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mmtoken", "mmtoken.adapters", "mmtoken.world", "mmtoken.plugins", "mmtoken.benchmarks", "mmtoken.tokenizers"],
    package_dir={"mmtoken": "mmtoken", "mmtoken.plugins": "plugins", "mmtoken.benchmarks": "benchmarks"},
    package_data={"mmtoken": ["checkpoints/*/*.json", "checkpoints/*/*.safetensors"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "transformers>=5.20,<6",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tokenizers>=0.20",
        "tqdm",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "accelerate>=1.0"],
        "accelerate": ["accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["mmtoken=mmtoken.cli:main"]},
)
