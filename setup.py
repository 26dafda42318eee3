from setuptools import find_packages, setup

setup(
    name="modeling-llama2",
    version="0.1.0",
    description="Llama 2 for the Hugging Face ecosystem: model, checkpoint conversion and Llama 2-Chat alignment trainers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["modeling_llama2", "modeling_llama2.*", "conversion", "conversion.*"]),
    python_requires=">=3.11",
    install_requires=[
        # CPU or CUDA build, whichever is installed first. Both ends are tested: 2.13.0 and 2.14.1 (README,
        # "Supported versions"); .ci/lowest.txt pins the lower end of every other range.
        "torch>=2.13,<2.15",
        # 5.24 renamed `past_key_values` to `cache`; the model follows the new name.
        "transformers>=5.24,<6",
        "safetensors>=0.8,<1",  # transformers 5.24's own lower bounds
        "tokenizers>=0.23.1,<0.24",
        "accelerate>=1.10,<2",
        "sentencepiece>=0.2,<0.3",
        "protobuf>=4.21.1,<8",  # to read a sentencepiece model's trainer and normalizer settings
        "tqdm>=4.60",
    ],
    extras_require={
        "peft": ["peft>=0.21,<0.22"],
        "plot": ["matplotlib>=3.8"],
        "test": ["pytest>=8", "peft>=0.21,<0.22", "matplotlib>=3.8"],
        "dev": ["pytest>=8", "peft>=0.21,<0.22", "matplotlib>=3.8", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["llama2-convert=conversion.__main__:main"]},
)
