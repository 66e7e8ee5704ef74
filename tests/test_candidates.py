"""Preference data as the paper makes it: the pair rule (strictly better on both tracks), the merge of human
labels with automatic verdicts, `anyid-rt train candidates` (sets from ID groups, generation, scoring,
matchups, resuming, its error exits) and the chain candidates -> labels -> pairs -> Flow-DPO on the tiny model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from anyid_rt import Engine, media
from anyid_rt.cli import main
from anyid_rt.trainer.candidates import (CandidatesError, CandidatesFolder, CandidatesOptions, auto_verdicts, compare,
                                         merge_pairs, read_sets, run_candidates, sets_from_groups)
from anyid_rt.trainer.config import DPOConfig, LoraConfig, ModelSource, OptimConfig
from anyid_rt.trainer.label import LabelSession, read_labels
from anyid_rt.trainer.pairs import PreferencePair, dominance, merge_axis, pareto_filter, read_pairs
from anyid_rt.trainer.synthetic import make_clip

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ROOT / "configs" / "data" / "id_groups"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------------------------

def test_pair_rule_is_strictly_better_on_both_tracks():
    pairs = [PreferencePair(f"p{i}", ("r.png",), "w.mp4", "l.mp4", a, b)
             for i, (a, b) in enumerate([(1, 1), (1, 0), (0, 1), (0, 0), (1, -1), (-1, -1)])]
    assert [p.prompt for p in pareto_filter(pairs)] == ["p0"]  # identity 1 / prompt 0 is rejected (paper 4.4)
    # dominance: who wins both tracks, 0 for ties and splits, None while a track is open
    table = {(1, 1): 1, (-1, -1): -1, (1, 0): 0, (0, -1): 0, (0, 0): 0, (1, -1): 0, (None, 1): None, (1, None): None}
    for (i, p), want in table.items():
        assert dominance(i, p) == want, (i, p)
    # merge: a human label wins over the automatic verdict, either fills in for the other, none leaves it open
    assert merge_axis(0, 1) == (0, "human") and merge_axis(-1, 1) == (-1, "human")
    assert merge_axis(None, -1) == (-1, "auto") and merge_axis(None, None) == (None, None)


def test_automatic_verdicts_use_margins_and_never_guess():
    assert compare(0.50, 0.47, 0.02) == 1 and compare(0.47, 0.50, 0.02) == -1 and compare(0.50, 0.49, 0.02) == 0
    assert compare(None, 0.5, 0.0) is None and compare(0.5, 0.5, 0.0) == 0
    axes = {"identity": {"automatic": True, "margin": 0.02},
            "prompt": {"automatic": True, "metric": "clip-text+element", "margin": 0.01}}
    a = {"identity": 0.6, "clip_text": 0.30, "element": 0.80}
    b = {"identity": 0.5, "clip_text": 0.25, "element": 0.70}
    assert auto_verdicts(a, b, axes) == {"identity": 1, "prompt": 1}
    assert auto_verdicts(b, a, axes) == {"identity": -1, "prompt": -1}
    # follows the prompt better but keeps less of the primary: a tie on the combined metric
    assert auto_verdicts({**a, "element": 0.5}, b, axes)["prompt"] == 0
    # a video with no face has no identity score; a track without a model has no verdict
    assert auto_verdicts({**a, "identity": None}, b, axes)["identity"] is None
    no_clip = {**axes, "prompt": {"automatic": False}}
    assert auto_verdicts(a, b, no_clip) == {"identity": 1, "prompt": None}
    assert auto_verdicts(None, b, axes) == {"identity": None, "prompt": None}


def test_sets_from_id_groups_and_from_a_sets_file(tmp_path):
    sets = sets_from_groups(GROUPS, max_references=2, similarity="jaccard")
    assert [s.id for s in sets] == ["person_00.t000", "person_00.t001", "person_00.t002"]
    clips = sorted(str(p) for p in (GROUPS / "person_00").glob("clip_*.mp4"))
    s0 = sets[0]
    assert list(s0.references) == clips[1:] and s0.primary == 0 and sorted(s0.group) == clips
    assert str(GROUPS / "person_00" / "clip_000.mp4") not in s0.references  # the target is not a reference
    # the differential prompt drops what the primary (clip 1) already shows: the same hairstyle and clothes
    assert "Hairstyle" not in s0.prompt and "Expression: A calm, confident smile." in s0.prompt
    assert s0.identity_references[:2] == list(s0.references) and sorted(s0.identity_references) == clips
    assert len(sets_from_groups(GROUPS, per_group=1, similarity="jaccard")) == 1

    f = tmp_path / "sets.jsonl"
    f.write_text("# sets\n" + json.dumps({"id": "a", "prompt": "Expression: a grin.", "references": [clips[0]],
                                          "group": str(GROUPS / "person_00"), "seed": 3}) + "\n")
    (s,) = read_sets(f)
    assert s.group == tuple(clips) and s.seed == 3 and s.primary == 0
    for bad, match in [({"id": "a b"}, "id must be"), ({"prompt": ""}, "prompt must be"),
                       ({"references": ["nope.png"]}, r"reference 0 \(.*nope.png\): file not found"),
                       ({"primary": 2}, "primary must index"), ({"group": 3}, "group must be"),
                       ({"extra": 1}, r"unknown key\(s\) \['extra'\]")]:
        f.write_text(json.dumps({"id": "a", "prompt": "x", "references": [clips[0]], **bad}) + "\n")
        with pytest.raises(CandidatesError, match=rf"sets.jsonl:1: .*{match}"):
            read_sets(f)


# ---------------------------------------------------------------------------------------------------------------
# Generation and scoring
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FakeVideo:
    frames: torch.Tensor
    fps: int = 8

    def save(self, path):
        media.write_mp4(self.frames, path, fps=self.fps, crf=12)


def hopper() -> np.ndarray:
    import matplotlib
    from PIL import Image

    img = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    return np.asarray(img.resize((128, 128)))


class ClipEngine:
    """Stands in for a model: candidate seed s shows `faces[s]`, the astronaut (the ID group's person) moving,
    or another person, at 128 x 128. Counts its calls."""

    def __init__(self, faces: dict[int, str] | None = None, frames: int = 9, die_at: int | None = None):
        self.faces, self.frames, self.calls, self.die_at = faces or {}, frames, [], die_at

    def generate(self, prompt, references, primary, seed, progress, **gen):
        self.calls.append((prompt, seed))
        if len(self.calls) == self.die_at:
            raise KeyboardInterrupt  # Ctrl-C while generating
        clip = make_clip(seed + 17, self.frames, (128, 128))
        if self.faces.get(seed) == "other":
            shift = [np.roll(hopper(), 2 * i, axis=1) for i in range(self.frames)]
            clip = np.stack(shift)
        return FakeVideo(torch.from_numpy(clip))


def options(out, **kw) -> CandidatesOptions:
    from anyid_rt.eval import EvalConfig

    base = dict(out=str(out), data=str(GROUPS), tiny=True, similarity="jaccard", eval=EvalConfig(stride=2),
                progress=False)
    base.update(kw)
    return CandidatesOptions(**base)


def _tiny_clip(folder: Path) -> None:
    from test_eval import _tiny_clip as make  # the random tiny CLIP folder of the evaluator's tests

    make(folder)


def test_scores_make_automatic_verdicts_and_human_labels_win_per_track(tmp_path):
    """Candidate 0 shows the ID group's person, candidate 1 someone else: the identity track's automatic
    verdict is candidate 0; without --clip the prompt track has none, so no pair until a human labels it."""
    out = tmp_path / "cand"
    engine = ClipEngine({0: "astronaut", 1: "other"})
    summary = run_candidates(options(out, per_group=1), engine=engine, log=lambda s: None)
    folder = CandidatesFolder.load(out)
    (m,) = folder.matchups
    assert m.id == "person_00.t000.k0-k1" and m.auto == {"identity": 1, "prompt": None}
    # the same person against the group's 64-pixel clips, and someone else (SFace all-reference scores)
    assert m.a["scores"]["identity"] > 0.3 and m.b["scores"]["identity"] < 0.1
    axes = json.loads((out / "candidates.json").read_text())["axes"]
    assert axes["identity"]["automatic"] and axes["identity"]["metric"] == "sface.all_reference"
    assert not axes["prompt"]["automatic"] and "--clip" in axes["prompt"]["note"]
    assert summary.pairs == 0 and summary.undecided == {"identity": 0, "prompt": 1}
    assert read_pairs(out / "pairs.jsonl") == []

    # the prompt track labelled for candidate 0: a pair, winner candidate 0, identity from the scores
    s = merge_pairs(folder, {(m.id, "prompt"): 1})
    (p,) = read_pairs(out / "pairs.jsonl")
    assert s.pairs == 1 and s.sources == {"auto": 1, "human": 1}
    assert p.winner == str(out / m.a["video"]) and p.loser == str(out / m.b["video"])
    line = json.loads((out / "pairs.jsonl").read_text())
    assert line["sources"] == {"identity": "auto", "prompt": "human"} and line["matchup"] == m.id
    # a human tie, or a human identity label against the score, rejects the matchup
    assert merge_pairs(folder, {(m.id, "prompt"): 0}).rejected == 1
    assert merge_pairs(folder, {(m.id, "prompt"): 1, (m.id, "identity"): -1}).rejected == 1
    # the other way round on both tracks: candidate 1 is the winner
    merge_pairs(folder, {(m.id, "prompt"): -1, (m.id, "identity"): -1})
    assert read_pairs(out / "pairs.jsonl")[0].winner == str(out / m.b["video"])

    # a CLIP folder gives the prompt track its automatic verdict (random weights: some verdict), and a rerun
    # keeps every video: only the scores are recomputed for the new evaluator settings
    from anyid_rt.eval import EvalConfig

    _tiny_clip(tmp_path / "clip")
    run_candidates(options(out, per_group=1, prompt_margin=0.0, eval=EvalConfig(stride=2, clip=str(tmp_path / "clip"))),
                   engine=engine, log=lambda s: None)
    (m2,) = CandidatesFolder.load(out).matchups
    assert len(engine.calls) == 2 and m2.auto["identity"] == 1 and m2.auto["prompt"] in (1, -1)
    assert json.loads((out / "candidates.json").read_text())["axes"]["prompt"]["metric"] == "clip-text"


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "cand"
    with pytest.raises(KeyboardInterrupt):
        run_candidates(options(out, per_group=2, eval=None), engine=ClipEngine(die_at=3), log=lambda s: None)
    assert sorted(p.name for p in (out / "videos").iterdir()) == [
        "person_00.t000.k0.json", "person_00.t000.k0.mp4", "person_00.t000.k1.json", "person_00.t000.k1.mp4"]
    assert not (out / "matchups.jsonl").exists() and not [p for p in out.rglob("*") if ".partial" in p.name]
    again = ClipEngine()
    logs = []
    summary = run_candidates(options(out, per_group=2, eval=None), engine=again, log=logs.append)
    assert [seed for _, seed in again.calls] == [0, 1] and "2 of 4 candidate(s) already generated" in logs[0]
    assert summary.undecided == {"identity": 2, "prompt": 2}  # no scoring: every track is for people
    # a folder made with another model is refused: its videos would mix two models
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "run": {"model": "/models/other", "lora": [], "tiny": False}}))
    with pytest.raises(ValueError, match="holds videos of another run"):
        run_candidates(options(out, per_group=2, eval=None), engine=again)


def test_malformed_folders_name_the_file_and_line(tmp_path):
    import shutil

    good = tmp_path / "good"
    run_candidates(options(good, per_group=1, eval=None), engine=ClipEngine(), log=lambda s: None)
    matchup = (good / "matchups.jsonl").read_text()
    sets = (good / "sets.jsonl").read_text()
    (tmp_path / "outside.png").write_bytes((good / json.loads(sets)["references"][0]).read_bytes())
    cases = [
        ("matchups.jsonl", matchup.replace('"identity": null', '"identity": true'), r"matchups.jsonl:1: auto must be"),
        ("matchups.jsonl", matchup.replace("videos/person_00.t000.k1.mp4", "../../x.mp4"),
         r"matchups.jsonl:1: b: '../../x.mp4' is not a path inside the candidates folder"),
        ("matchups.jsonl", matchup + matchup, r"matchups.jsonl:2: matchup .* appears twice"),
        ("matchups.jsonl", "", r"matchups.jsonl: no matchups"),
        ("sets.jsonl", sets.replace(json.loads(sets)["references"][0], "../outside.png"),
         r"sets.jsonl:1: set person_00.t000 file 0: '../outside.png' is not a path inside"),
        ("sets.jsonl", sets + sets, r"sets.jsonl:2: set 'person_00.t000' appears twice"),
        ("sets.jsonl", "[1, 2]\n", r"sets.jsonl:1: expected a JSON object"),
        ("candidates.json", '{"version": 2}', r"candidates.json: not a version-1 candidates manifest"),
    ]
    for n, (name, text, match) in enumerate(cases):
        bad = tmp_path / f"bad{n}"
        shutil.copytree(good, bad)
        (bad / name).write_text(text)
        with pytest.raises(CandidatesError, match=match):
            CandidatesFolder.load(bad)
    (good / "sets.jsonl").unlink()
    with pytest.raises(CandidatesError, match=r"sets.jsonl: file not found \(the candidates folder is incomplete"):
        CandidatesFolder.load(good)


def test_labels_log_replays_undo_survives_a_torn_write_and_drops_stale_labels(tmp_path):
    from anyid_rt.trainer.label import LabelError

    out = tmp_path / "cand"
    run_candidates(options(out, per_group=1, eval=None), engine=ClipEngine(), log=lambda s: None)
    session = LabelSession(out, annotator="ann")
    (m,) = session.folder.matchups
    session.label({"matchup": m.id, "axis": "identity", "choice": "a"})
    session.label({"matchup": m.id, "axis": "identity", "choice": "b"})  # a second opinion on the same task
    session.undo()  # takes back "b": "a" stands again
    session.label({"matchup": m.id, "axis": "prompt", "choice": "a"})
    labels = out / "labels.jsonl"
    records = [json.loads(x) for x in labels.read_text().splitlines()]
    assert [r["op"] for r in records] == ["label", "label", "undo", "label"] and records[0]["annotator"] == "ann"
    assert read_labels(session.folder) == {(m.id, "identity"): 1, (m.id, "prompt"): 1}
    assert len(read_pairs(out / "pairs.jsonl")) == 1  # the page keeps pairs.jsonl current
    # a write cut short (a crash mid-record) is ignored, and dropped before the next record is appended
    with open(labels, "a") as f:
        f.write('{"op": "label", "matchup": "')
    assert read_labels(session.folder) == {(m.id, "identity"): 1, (m.id, "prompt"): 1}
    again = LabelSession(out)
    assert again.error is None and again.undo()["done"] == 1
    assert [json.loads(x)["op"] for x in labels.read_text().splitlines()] == ["label", "label", "undo", "label", "undo"]
    assert again.undo()["done"] == 0
    with pytest.raises(LabelError, match="nothing to undo"):
        again.undo()
    # a malformed record in the middle is an error that names the line (the page shows it)
    labels.write_text('{"op": "relabel"}\n' + labels.read_text())
    assert LabelSession(out).error.endswith('labels.jsonl:1: op must be "label" or "undo", got \'relabel\'')
    labels.write_text("\n".join(labels.read_text().splitlines()[1:]) + "\n")
    # candidates made again (another seed): the judgements were for other videos and no longer count
    LabelSession(out).label({"matchup": m.id, "axis": "prompt", "choice": "tie"})
    run_candidates(options(out, per_group=1, eval=None, seed=5), engine=ClipEngine(), log=lambda s: None)
    folder = CandidatesFolder.load(out)
    assert read_labels(folder) == {} and LabelSession(out).state()["done"] == 0


def test_two_pages_on_the_two_tracks_share_a_folder(tmp_path):
    from anyid_rt.trainer.label import LabelError

    out = tmp_path / "cand"
    run_candidates(options(out, per_group=1, eval=None), engine=ClipEngine(), log=lambda s: None)
    ident, prompt = LabelSession(out, track="identity"), LabelSession(out, track="prompt")
    (m,) = ident.folder.matchups
    assert [t["axis"] for t in ident.state()["tasks"]] == ["identity"]
    with pytest.raises(LabelError, match="of this page's tasks"):
        ident.label({"matchup": m.id, "axis": "prompt", "choice": "a"})
    ident.label({"matchup": m.id, "axis": "identity", "choice": "b"})
    st = prompt.label({"matchup": m.id, "axis": "prompt", "choice": "b"})
    assert st["pairs"].startswith("1 pair(s)")  # the prompt page saw the identity page's judgement
    assert not ident.undo()["can_undo"]  # the identity page takes back its own judgement only
    assert read_labels(CandidatesFolder.load(out)) == {(m.id, "prompt"): -1}
    assert read_pairs(out / "pairs.jsonl") == []


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """`anyid-rt train candidates` on the tiny model and the tiny ID group: 2 sets x 2 candidates."""
    out = tmp_path_factory.mktemp("tiny") / "cand"
    argv = ["train", "candidates", "--data", str(GROUPS), "--sets-per-group", "2", "--tiny", "--steps", "2",
            "--similarity", "jaccard", "--stride", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out, argv


def test_candidates_on_the_tiny_model_resume_and_label(tiny_folder, capsys, monkeypatch):
    out, argv = tiny_folder
    folder = CandidatesFolder.load(out)
    assert [m.id for m in folder.matchups] == ["person_00.t000.k0-k1", "person_00.t001.k0-k1"]
    for name in ("candidates.json", "run.json", "sets.jsonl", "matchups.jsonl", "pairs.jsonl"):
        assert (out / name).is_file()
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == [
        "person_00.t000.k0.mp4", "person_00.t000.k1.mp4", "person_00.t001.k0.mp4", "person_00.t001.k1.mp4"]
    assert len(media.read_video(out / "videos" / "person_00.t000.k0.mp4").frames) == 9
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    # the tiny model's videos are noise: no face, so no automatic verdict on either track (never guessed)
    assert all(m.auto == {"identity": None, "prompt": None} for m in folder.matchups)
    # the folder is self-contained: references and the ID group's clips were copied into refs/
    s = folder.sets["person_00.t000"]
    assert all(r.startswith("refs/") for r in s.references + s.group) and len(set(s.group)) == 3

    # resuming: nothing is generated again (the engine is never built: Engine.from_plan would raise)
    monkeypatch.setattr(Engine, "from_plan", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 of 4 candidate(s) already generated" in capsys.readouterr().out

    # labels through the page's API (the browser test drives the page itself): both tracks of both matchups
    session = LabelSession(out)
    st = session.state()
    assert (st["done"], st["total"]) == (0, 4) and [t["axis"] for t in st["tasks"]] == ["identity", "prompt"] * 2
    ident = st["tasks"][0]
    assert ident["prompt"] is None and len(ident["references"]) == 3  # the whole ID group, no prompt
    assert st["tasks"][1]["prompt"] == s.prompt and st["tasks"][1]["references"] == ["/files/" + s.references[0]]
    m0, m1 = (m.id for m in folder.matchups)
    for m, axis, choice in [(m0, "identity", "a"), (m0, "prompt", "a"), (m1, "identity", "b"), (m1, "prompt", "tie"),
                            (m1, "prompt", "b")]:
        if (m, axis) == (m1, "prompt") and choice == "b":
            assert session.undo()["done"] == 3  # the tie is taken back
        st = session.label({"matchup": m, "axis": axis, "choice": choice})
    assert st["done"] == 4 and st["current"] is None
    assert read_labels(folder) == {(m0, "identity"): 1, (m0, "prompt"): 1, (m1, "identity"): -1, (m1, "prompt"): -1}
    capsys.readouterr()
    assert main(["train", "pairs", str(out)]) == 0
    assert "2 pair(s)" in capsys.readouterr().out
    pairs = read_pairs(out / "pairs.jsonl")
    assert [Path(p.winner).name for p in pairs] == ["person_00.t000.k0.mp4", "person_00.t001.k1.mp4"]
    assert pairs[0].references == tuple(str(out / r) for r in s.references) and pairs[0].prompt == s.prompt


def test_candidates_labels_pairs_then_flow_dpo(tiny_folder, tmp_path):
    """The last link: Flow-DPO reads a pairs file made from the folder's matchups and human labels (here every
    track says candidate 0; written outside the folder, so its paths lead back into it)."""
    from anyid_rt.trainer.dpo import train_dpo

    out, _ = tiny_folder
    folder = CandidatesFolder.load(out)
    human = {(m.id, axis): 1 for m in folder.matchups for axis in ("identity", "prompt")}
    summary = merge_pairs(folder, human, tmp_path / "pairs" / "pairs.jsonl")
    assert summary.pairs == 2 and summary.sources == {"human": 4}
    assert json.loads((tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()[0])["winner"].startswith("../")
    cfg = DPOConfig(output_dir=str(tmp_path / "dpo"), model=ModelSource(preset="tiny"), pairs=str(summary.path),
                    buckets=((9, 64, 64),), lora=LoraConfig(rank=4, alpha=4.0), optim=OptimConfig(lr=1e-3),
                    max_steps=2, checkpoint_every=0, log_every=1, mixed_precision="fp32",
                    gradient_checkpointing=False, batch_size=1, progress=False)
    result = train_dpo(cfg)
    assert result.step == 2 and Path(result.lora_path).is_file()
    assert result.history[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-6)  # a fresh LoRA: log 2


def test_bad_input_exits_2_before_anything_loads(tmp_path, capsys):
    def run(*args):
        capsys.readouterr()
        code = main(["train", "candidates", "--similarity", "jaccard", *map(str, args)])
        return code, capsys.readouterr().err

    out = tmp_path / "out"
    sets = tmp_path / "sets.jsonl"
    sets.write_text('{"id": "a", "prompt": "x", "references": ["missing.png"]}\n')
    cases = [
        (["--data", GROUPS, "--sets", sets, "--tiny"], "give --data ROOT .* or --sets FILE"),
        (["--data", tmp_path / "none", "--tiny"], r"--data = .*none\": data folder .* not found"),
        (["--sets", sets, "--tiny"], r"--sets = .*sets.jsonl:1: set a: reference 0 .*missing.png\): file not found"),
        (["--data", GROUPS, "--tiny", "--k", "1"], "--k 1: must be an integer >= 2"),
        (["--data", GROUPS, "--tiny", "--frames", "10"], r"--data = .*: set person_00.t000: --frames.*10"),
        (["--data", GROUPS, "--tiny", "--identity-margin", "-1"], "--identity-margin -1.0: must be >= 0"),
        (["--data", GROUPS, "--tiny", "--clip", tmp_path], r"^scoring: .*clip.*or pass --no-scoring"),
        (["--data", GROUPS, "--tiny", "--lora", tmp_path / "x.safetensors"], r"--lora .*x.safetensors.*not found"),
    ]
    for args, match in cases:
        code, err = run(*args, "--out", out, "--no-progress")
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        import re

        assert re.search(match, err.split("error: ", 1)[1]), (match, err)
        assert not out.exists()
    # `train pairs` on something that is not a candidates folder
    capsys.readouterr()
    assert main(["train", "pairs", str(tmp_path)]) == 2
    assert "no candidates.json, so not a candidates folder" in capsys.readouterr().err
