from setuptools import setup

setup(
    name="aunn_fast",
    version="0.1.0",
    description="Absolute Unit Neural Networks (AUNNs): fused Triton training and inference from int64 indices",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and bench/ live at the top of the repository but install under aunn_fast,
    # so no generic top-level `kernels` module lands in site-packages.
    packages=["aunn_fast", "aunn_fast.kernels", "aunn_fast.bench"],
    package_dir={"aunn_fast": "aunn_fast", "aunn_fast.kernels": "kernels", "aunn_fast.bench": "bench"},
    install_requires=[
        "torch>=2.8",  # torch.library.triton_op; torch.mm(out_dtype=) for bf16 GEMMs with fp32 results
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        "triton>=3.1; platform_system == 'Linux'",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-xdist"], "tensorboard": ["tensorboard"]},
    entry_points={"console_scripts": ["aunn=aunn_fast.cli:main"]},
)
