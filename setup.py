"""mmtoken: compress and control the visual tokens of multimodal LLMs in Hugging Face transformers."""

from setuptools import setup

# what lmms-eval 0.7.3 needs to import and run simple_evaluate (filelock < 4: it patches filelock._api)
LMMS_EVAL_DEPS = ["datasets", "evaluate", "loguru", "tenacity", "pytz", "sacrebleu", "pytablewriter", "filelock<4"]

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
        "test": ["pytest>=7", "accelerate>=1.0", *LMMS_EVAL_DEPS],
        "accelerate": ["accelerate>=1.0"],
        # lmms-eval itself is installed with --no-deps (its declared dependencies pull a CUDA build of torch
        # and tools it does not need to evaluate): see docs/benchmarks.md
        "lmms-eval": LMMS_EVAL_DEPS,
    },
    entry_points={"console_scripts": ["mmtoken=mmtoken.cli:main"], "lmms_eval.models": ["mmtoken = mmtoken.lmms_eval:manifest"]},
)
