"""The two-sample report (`meloformer evaluate --against`): features worked out by hand on tiny pieces, the
Fréchet distance and the classifier on real pieces, and the command's files and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _music import DEMO_MIDI, make_score
from meloformer.features import feature_vector, piece_features
from meloformer.hid import HIDTokenizer
from meloformer.report import (
    NO_SKLEARN,
    classifier_accuracy,
    frechet,
    frechet_distance,
    markdown,
    read_folder,
    separation,
    two_sample,
)

TOK = HIDTokenizer()


def features(score, **kwargs) -> dict:
    return piece_features(TOK, TOK.encode(score), **kwargs)


def bar(start: float, pitches: list[int]) -> list[tuple[float, float, int, int]]:
    """Quarter notes from quarter ``start``."""
    return [(start + i, 1, p, 90) for i, p in enumerate(pitches)]


def eighths(start: float, pitches: list[int]) -> list[tuple[float, float, int, int]]:
    return [(start + i / 2, 0.5, p, 90) for i, p in enumerate(pitches)]


def test_repetition_counts_exact_and_near_repeats_of_a_track():
    # Bars 0-2 alike, bar 3 new: 2 of 4 bars repeat an earlier one.
    notes = bar(0, [60, 62, 64, 65]) + bar(4, [60, 62, 64, 65]) + bar(8, [60, 62, 64, 65]) + bar(12, [67, 69, 71, 72])
    assert features(make_score([(0, False, notes)]))["repetition"] == pytest.approx(2 / 4)
    # Eight eighths, one changed: 7 shared of 9 distinct notes (0.78) is a near repeat; one of four
    # quarters changed (3 of 5, 0.6) is not.
    line = [60, 62, 64, 65, 67, 65, 64, 62]
    near = eighths(0, line) + eighths(4, line[:-1] + [59])
    far = bar(0, [60, 62, 64, 65]) + bar(4, [60, 62, 64, 67])
    assert features(make_score([(0, False, near)]))["repetition"] == pytest.approx(1 / 2)
    assert features(make_score([(0, False, far)]))["repetition"] == 0.0


def test_voice_leading_of_two_voices_by_hand():
    # Upper G4 A4 B4 over lower C4 D4 G4: a fifth moving up to a fifth (parallel), then a fifth to a third.
    upper, lower = bar(0, [67, 69, 71]), bar(0, [60, 62, 67])
    f = features(make_score([(52, False, upper), (53, False, lower)]))
    assert f["parallels"] == pytest.approx(1 / 2)
    assert f["crossings"] == 0.0
    assert f["stepwise"] == pytest.approx(3 / 4)  # moves 2, 2, 2, 5 semitones
    # The lower voice (lower on average) rises above the upper at the third of four onsets.
    crossing = features(make_score([(52, False, bar(0, [72, 72, 64, 72])), (53, False, bar(0, [60, 60, 67, 60]))]))
    assert crossing["crossings"] == pytest.approx(1 / 4)
    assert crossing["parallels"] == 0.0  # 12 -> 3 -> 12: never the same perfect interval twice
    one_voice = features(make_score([(0, False, upper)]))
    assert one_voice["parallels"] is None and one_voice["crossings"] is None


def test_meter_key_and_chord_rates_by_hand():
    # Bar 0: C E G C over a held C3; bar 1: G B D G over a held G2; 6/8 bars of three quarters.
    c_bar, g_bar = bar(0, [60, 64, 67]), bar(3, [67, 71, 74])
    bass = [(0, 3, 48, 90), (3, 3, 43, 90)]
    score = make_score([(0, False, c_bar + g_bar), (32, False, bass)], time_signatures=[(0, 6, 8)])
    c, g = TOK.chords.index((0, "maj")), TOK.chords.index((7, "maj"))
    f = features(score, chords=[c, g], key="C major")
    assert (f["meter"], f["bar_quarters"], f["triple_meter"]) == ("6/8", 3.0, 1.0)
    # Bar 1 (the only bar with a bar before it): G B D G all in G major; against C major only G and G.
    assert f["chord_tone_rate"] == 1.0
    assert f["chord_tone_rate_shifted"] == pytest.approx(2 / 4)
    assert f["bass_on_root"] == 1.0
    assert f["key"] == "C major" and f["key_agrees"] == 1.0
    assert features(score, chords=[g, c])["bass_on_root"] == 0.0


def test_chords_come_from_the_files_markers_where_it_has_them(tmp_path):
    import symusic

    # Bar 0 C E G C, bar 1 G B D G; the markers say the opposite: G major, then C major.
    score = make_score([(0, False, bar(0, [60, 64, 67, 72]) + bar(4, [67, 71, 74, 79]))])
    score.dump_midi(str(tmp_path / "detected.mid"))
    for q, name in ((0, "Gmaj"), (4, "Cmaj")):
        score.markers.append(symusic.TextMeta(q * 480, name))
    score.dump_midi(str(tmp_path / "marked.mid"))
    rows = {r["file"]: r for r in read_folder(tmp_path, TOK)[0]}
    assert rows["detected.mid"]["chord_source"] == "detected" and rows["detected.mid"]["chord_tone_rate"] == 1.0
    # Bar 1's G B D G against the marked C major: G and G.
    assert rows["marked.mid"]["chord_source"] == "markers" and rows["marked.mid"]["chord_tone_rate"] == 0.5
    assert rows["marked.mid"]["chord_tone_rate_shifted"] == 1.0  # against bar 0's marked G major
    # Scored like a real file, against the chords detected from its own notes, whatever the markers say.
    assert rows["marked.mid"]["chord_tone_rate_own"] == rows["detected.mid"]["chord_tone_rate_own"] == 1.0


def test_region_leaps_range_and_consonance():
    # A piano line over bars 0-2: C4, then C5 (the region), then D4; a bass holds C3 throughout. The bass
    # is track 0 (HID puts bass before piano, and tracks are numbered as `--infill` numbers them).
    melody = [(0, 4, 60, 90), (4, 4, 72, 90), (8, 4, 62, 90)]
    f = features(make_score([(0, False, melody), (32, False, [(0, 12, 48, 90)])]), region=(1, 1, 1))
    assert (f["leap_in"], f["leap_out"]) == (12.0, 10.0)
    assert f["region_in_range"] == 0.0  # C5 is above the track's other notes (C4-D4)
    assert f["region_consonance"] == 1.0  # two octaves above the bass


def test_frechet_distance_by_hand_and_zero_for_identical_sets():
    # 1-D: (mean difference)^2 + (sd difference)^2 = (1 - 12)^2 + (sqrt 2 - sqrt 8)^2 = 121 + 2
    assert frechet_distance(np.array([[0.0], [2.0]]), np.array([[10.0], [14.0]])) == pytest.approx(123)
    x = np.random.default_rng(0).normal(size=(30, 5))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-9)
    same = frechet(x, x, bootstrap=20, rng=np.random.default_rng(0))
    assert same["distance"] == pytest.approx(0, abs=1e-9) and same["se"] > 0 and same["floor"] > 0


@pytest.fixture(scope="module")
def chorales_and_tunes():
    chorales, _, _ = read_folder(DEMO_MIDI / "bach_chorales", TOK)
    tunes = read_folder(DEMO_MIDI / "oneills_1850", TOK)[0] + read_folder(DEMO_MIDI / "ryans_mammoth", TOK)[0]
    return chorales, tunes


def test_classifier_tells_different_sets_apart_and_real_halves_not(chorales_and_tunes):
    pytest.importorskip("sklearn")
    chorales, tunes = chorales_and_tunes
    report = two_sample(tunes, chorales, bootstrap=10)
    assert report["classifier"]["generated_vs_real"]["balanced_accuracy"] > 0.9
    assert 0.3 < report["classifier"]["real_vs_real"]["balanced_accuracy"] < 0.7
    assert report["frechet"]["distance"] > 5 * report["frechet"]["floor"]
    # Two halves of the chorales as "generated" and "real": near chance, and far closer than the tunes.
    alike = [np.array([feature_vector(r) for r in rows]) for rows in (chorales[::2], chorales[1::2])]
    assert classifier_accuracy(*alike, folds=5, seed=0)["balanced_accuracy"] < 0.7
    assert frechet(*alike, bootstrap=0, rng=np.random.default_rng(0))["distance"] < report["frechet"]["distance"] / 5


def test_the_classifier_is_the_mean_over_its_splits(chorales_and_tunes):
    """Ten k-fold splits, each scored on its own, give the reported mean and ``split_sd`` (their scatter)."""
    pytest.importorskip("sklearn")
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score

    chorales, _ = chorales_and_tunes
    a, b = (np.array([feature_vector(r) for r in rows]) for rows in (chorales[::2], chorales[1::2]))
    ten = classifier_accuracy(a, b, folds=3, seed=1, repeats=10)
    x, y = np.vstack([a, b]), np.repeat([0, 1], [len(a), len(b)])
    folds = list(RepeatedStratifiedKFold(n_splits=3, n_repeats=10, random_state=1).split(x, y))
    forest = RandomForestClassifier(n_estimators=50, min_samples_leaf=2, class_weight="balanced", random_state=1)
    per_split = [
        cross_val_score(forest, x, y, cv=folds[3 * i : 3 * i + 3], scoring="balanced_accuracy").mean()
        for i in range(10)
    ]
    assert ten["repeats"] == 10 and ten["folds"] == 3
    assert ten["balanced_accuracy"] == pytest.approx(np.mean(per_split))
    assert ten["split_sd"] == pytest.approx(np.std(per_split, ddof=1)) and ten["split_sd"] > 0
    assert classifier_accuracy(a, b, folds=3, seed=1)["split_sd"] is None  # one split: nothing to spread


def test_separation_is_each_features_auc_by_hand(chorales_and_tunes):
    gen = [{"stepwise": 0.9, "parallels": 0.02}, {"stepwise": 0.5, "parallels": 0.03}]
    real = [{"stepwise": 0.5, "parallels": None}, {"stepwise": 0.7, "parallels": None}, {"stepwise": 0.5}]
    apart = separation(gen, real)
    # pairs (gen, real) for stepwise: 0.9 beats all 3; 0.5 ties two (1/2 each) and loses one -> (3 + 1) / 6
    assert apart["stepwise"] == pytest.approx(4 / 6) and apart["parallels"] is None
    chorales, tunes = chorales_and_tunes
    report = two_sample(tunes[:8], chorales, bootstrap=0)
    assert report["separation"]["voices"] == 0.0  # one voice against four: no overlap
    assert report["separation"]["bars"] is not None and 0 <= report["separation"]["pitch_class_entropy"] <= 1
    assert "| voices | 1 ± 0 |" in markdown(report) and "| 0.00 |" in markdown(report)


def test_report_without_scikit_learn_says_so(chorales_and_tunes, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    chorales, tunes = chorales_and_tunes
    report = two_sample(tunes[:6], chorales[:6], bootstrap=0)
    assert report["classifier"] is None and report["classifier_note"] == NO_SKLEARN
    assert report["frechet"]["distance"] > 0 and report["frechet"]["se"] is None


def meloformer(*args: str, cwd) -> subprocess.CompletedProcess:
    script = shutil.which("meloformer")
    assert script, "the meloformer console script is not installed (pip install -e .)"
    return subprocess.run([script, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_writes_the_report_and_refuses_a_missing_folder(tmp_path):
    gen, real = tmp_path / "gen", tmp_path / "real"
    gen.mkdir()
    real.mkdir()
    for path in sorted((DEMO_MIDI / "oneills_1850").glob("*.mid"))[:4]:
        shutil.copy(path, gen)
    for path in sorted((DEMO_MIDI / "bach_chorales").glob("*.mid"))[:6]:
        shutil.copy(path, real)
    out = tmp_path / "report"
    args = ("evaluate", "--generated", str(gen), "--against", str(real), "--out", str(out), "--bootstrap", "5",
            "--repeats", "2")  # fmt: skip
    done = meloformer(*args, "--bars", "8", "--prompt", str(next(real.iterdir())), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "distributions.png",
        "report.json",
        "report.md",
        "self_similarity.png",
    ]

    def no_nan(name):
        raise AssertionError(f"report.json holds {name}")

    report = json.loads((out / "report.json").read_text(), parse_constant=no_nan)
    assert report["generated"]["pieces"] == 4 and report["real"]["pieces"] == 6
    assert report["generated"]["bars"]["mean"] == report["real"]["bars"]["mean"] == 8  # --bars 8
    assert report["real"]["meters"] == {"4/4": 6} and report["prompt_key"] is not None
    assert report["classifier"] is None or report["classifier"]["generated_vs_real"]["repeats"] == 2
    # A single line has no voice pairs: null, and the count of pieces with a value is 0.
    assert report["generated"]["parallels"] == {"mean": None, "sd": None, "median": None, "n": 0}
    assert report["real"]["key_agrees"]["n"] == 6 and report["real"]["leap_out"]["n"] == 0
    assert all(p["key_agrees"] in (0.0, 1.0) for p in report["generated"]["per_piece"])
    table = (out / "report.md").read_text()
    assert "| repetition |" in table and "Fréchet distance" in table
    assert (out / "distributions.png").read_bytes()[:4] == b"\x89PNG"

    done = meloformer(
        "evaluate", "--generated", str(gen), "--against", str(tmp_path / "nowhere"), "--out", str(out), cwd=tmp_path
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert f"--against {tmp_path / 'nowhere'}: no such folder" in done.stderr
    for extra, problem in (
        (["--bars", "0"], "--bars must be at least 1, got 0"),
        (["--folds", "1"], "--folds must be at least 2, got 1"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--out", str(out / "report.md")], "is a file; give the report folder"),
    ):
        done = meloformer(*args, *extra, cwd=tmp_path)
        assert done.returncode == 2 and problem in done.stderr and done.stderr.strip().count("\n") == 0, extra


def test_sample_logger_logs_the_report_at_each_sampling_validation(demo_shards, tiny_model, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from meloformer.callbacks import SampleLogger
    from meloformer.datamodules import HIDDataModule
    from meloformer.module import MeloFormerModule

    real = tmp_path / "real"
    real.mkdir()
    for path in sorted((DEMO_MIDI / "bach_chorales").glob("*.mid"))[:4]:
        shutil.copy(path, real)
    logger = SampleLogger(every_n_validations=2, bars=2, instruments=[52, 53], against=str(real), report_samples=3)
    trainer = pl.Trainer(
        max_steps=2,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=[TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")],
        callbacks=[logger],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(
        MeloFormerModule(**tiny_model, warmup_steps=1),
        HIDDataModule(str(demo_shards), max_seq_len=256, max_segments=64),
    )
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent)).Reload()
    assert [e.step for e in events.Scalars("report/frechet")] == [2]  # validation 2 of 2 samples
    assert "report/frechet_floor" in events.Tags()["scalars"]
    assert "report/repetition" in (next((tmp_path / "csv").rglob("metrics.csv"))).read_text()
    assert [e.step for e in events.Tensors("report/text_summary")] == [2]
    assert len(logger.real) == 4
    with pytest.raises(ValueError, match="against=nowhere must be a folder"):
        SampleLogger(against="nowhere")
