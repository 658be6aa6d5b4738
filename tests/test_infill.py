"""Infilling: regions regenerated under the grammar, every other note of the prompt kept, track order kept."""

from __future__ import annotations

import numpy as np
import pytest
import symusic

import meloformer.infill as infill_module
from _music import demo_files
from meloformer.edits import crop_bars
from meloformer.fill import fill_row
from meloformer.grammar import HIDGrammar
from meloformer.hid import BAR as HID_BAR
from meloformer.hid import EOS, NOTE_COLUMNS, HIDTokenizer
from meloformer.infill import Region, check_infill, check_regions, infill, track_list
from meloformer.sampler import GenerationRequest, check_request

TOK = HIDTokenizer()
TRACK, BAR = NOTE_COLUMNS.index("track"), NOTE_COLUMNS.index("bar")


@pytest.fixture(scope="module")
def prompt() -> np.ndarray:
    """4 bars of a chorale: 4 tracks (programs 52, 52, 53, 53), every bar with notes."""
    chorale = next(f for f in demo_files() if "bach" in str(f))
    return crop_bars(TOK, TOK.encode(chorale), 0, 4)


def rows(notes: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(map(tuple, notes.tolist()))


def in_regions(notes: np.ndarray, regions: list[Region]) -> np.ndarray:
    inside = np.zeros(len(notes), dtype=bool)
    for r in regions:
        inside |= (notes[:, TRACK] == r.track - 1) & (notes[:, BAR] >= r.first - 1) & (notes[:, BAR] <= r.last - 1)
    return inside


@pytest.mark.parametrize(
    "regions, seed",
    [
        (["2:2-3"], 0),
        (["1:1-4"], 1),
        (["4:4"], 2),
        (["3:1", "3:3-4"], 3),  # two regions of one track
        (["2:2-3", "1:4", "4:1-2"], 4),  # three tracks, filled one after another
    ],
)
def test_infill_keeps_everything_outside_the_regions(model, prompt, regions, seed):
    regions = [Region.parse(r) for r in regions]
    tokens = infill(model, TOK, GenerationRequest(prompt=prompt), regions, seed=seed)
    piece, original = TOK.parse(tokens), TOK.parse(prompt)  # parse checks the grammar of the whole piece
    assert [t for t, _ in piece.tracks] == [t for t, _ in original.tracks]  # track order unchanged
    assert piece.n_bars == original.n_bars
    assert all(np.array_equal(a, b) for a, b in zip(piece.conductor, original.conductor))
    HIDGrammar.from_tokens(TOK, tokens, n_bars=4, instruments=[t for t, _ in original.tracks])
    before, after = TOK.note_table(prompt), TOK.note_table(tokens)
    assert rows(after[~in_regions(after, regions)]) == rows(before[~in_regions(before, regions)])
    # Token for token, too: every (track, bar) outside the regions is the prompt's.
    for number, ((_, bars), (_, old)) in enumerate(zip(piece.tracks, original.tracks)):
        for b, (new, prompt_bar) in enumerate(zip(bars, old)):
            if not any(r.track == number + 1 and r.first <= b + 1 <= r.last for r in regions):
                assert np.array_equal(new, prompt_bar), (number, b)
    # The regions were regenerated (an untrained model does not rewrite a chorale note for note).
    assert rows(after[in_regions(after, regions)]) != rows(before[in_regions(before, regions)])


def test_every_regenerated_bar_is_written(model, prompt, monkeypatch):
    """The sampler does not let a region bar close before its first note (the model cannot always tell where
    a region begins): even a model that always wants to close the bar writes a note in every region bar."""
    from meloformer.decoder import IncrementalDecoder

    def closing(run):
        def wrapped(self, tokens):
            logits = run(self, tokens).clone()
            logits[..., [HID_BAR, EOS]] += 50.0
            return logits

        return wrapped

    monkeypatch.setattr(IncrementalDecoder, "prefill", closing(IncrementalDecoder.prefill))
    monkeypatch.setattr(IncrementalDecoder, "step", closing(IncrementalDecoder.step))
    for seed in range(3):
        tokens = infill(model, TOK, GenerationRequest(prompt=prompt), [Region.parse("3:1-4")], seed=seed)
        assert all(len(bar) for bar in TOK.parse(tokens).tracks[2][1])


def test_a_fill_pass_stays_inside_the_token_budget(model, prompt, monkeypatch):
    """The least a fill row needs (the prompt without its region, the pass's Track and Bar tokens and the
    copied bars) is the sampler's reserve exactly, and with a budget a few tokens above it (room for a note
    per region bar) the row written stays inside it."""
    import meloformer.sampler as sampler_module

    rows = []
    merge = sampler_module.fill.merge
    monkeypatch.setattr(sampler_module.fill, "merge", lambda tok, out, t, b: rows.append(out) or merge(tok, out, t, b))
    empty_region = fill_row(TOK, prompt, 0, 2, 3)
    region_tokens = sum(len(bar) for bar in TOK.parse(prompt).tracks[0][1][2:4])
    least = len(empty_region) - region_tokens + 2 * 4  # the region's own tokens out, a note per bar in
    request = infill_module._track_request(GenerationRequest(prompt=prompt), prompt, 0, {2, 3})
    check_request(TOK, request, capacity=least - 2 * 4)  # the pass with empty region bars fits exactly
    with pytest.raises(ValueError, match="need at least"):
        check_request(TOK, request, capacity=least - 2 * 4 - 1)
    for seed in range(3):
        request = GenerationRequest(prompt=prompt, max_tokens=least + 6)
        infill(model, TOK, request, [Region.parse("1:3-4")], seed=seed)
        assert len(rows[-1]) <= least + 6


def test_infill_is_reproducible_per_seed(model, prompt):
    request, regions = GenerationRequest(prompt=prompt), [Region.parse("2:2-3")]
    first = infill(model, TOK, request, regions, seed=5)
    assert np.array_equal(first, infill(model, TOK, request, regions, seed=5))
    assert not np.array_equal(first, infill(model, TOK, request, regions, seed=6))


def test_each_track_is_regenerated_with_the_prompt_in_its_order(model, prompt, monkeypatch):
    seen = []

    def fake_generate(model, tok, request, seed, progress, steer):
        seen.append(request)
        assert steer.track == 5 and steer.bars == {1, 2}  # the fill pass, after the conductor and 4 tracks
        return request.prompt  # nothing regenerated: the result must be the prompt again

    monkeypatch.setattr(infill_module, "generate", fake_generate)
    tokens = infill(model, TOK, GenerationRequest(prompt=prompt, temperature=0.7), [Region.parse("2:2-3")], seed=0)
    assert np.array_equal(tokens, prompt)
    (request,) = seen
    assert np.array_equal(request.prompt, prompt)
    assert request.regenerate == [(1, 1), (1, 2)] and request.temperature == 0.7 and request.bars is None
    check_request(TOK, request)


def test_the_model_writes_the_region_in_a_fill_pass_after_the_whole_piece(model, prompt, monkeypatch):
    """What the model reads is the fill row: the region empty in place, every track in full, then the pass."""
    from meloformer.decoder import IncrementalDecoder

    prefills = []
    prefill = IncrementalDecoder.prefill
    monkeypatch.setattr(
        IncrementalDecoder, "prefill", lambda self, t: prefills.append(t[0].tolist()) or prefill(self, t)
    )  # noqa: E501
    tokens = infill(model, TOK, GenerationRequest(prompt=prompt), [Region.parse("2:2-3")], seed=0)
    row = fill_row(TOK, tokens, 1, 1, 2)
    (read,) = prefills
    assert read == row[: len(read)].tolist() and read[-1] == HID_BAR
    assert len(read) == len(row) - len(TOK.parse(tokens).tracks[1][1][1]) - len(TOK.parse(tokens).tracks[1][1][2]) - 2
    with pytest.raises(ValueError, match="one track at a time"):
        check_request(TOK, GenerationRequest(prompt=prompt, regenerate=[(0, 1), (1, 1)]))


@pytest.mark.parametrize(
    "text, region", [("2:5-8", Region(2, 5, 8)), ("1:3", Region(1, 3, 3)), (" 3 : 1 - 2 ", Region(3, 1, 2))]
)
def test_region_parse(text, region):
    assert Region.parse(text) == region


@pytest.mark.parametrize("text", ["2", "a:1-2", "2:1-", "2:3-1", "0:1-2", "1:0-2", "2:1-2-3", ""])
def test_bad_region_is_one_line(text):
    with pytest.raises(ValueError, match="infill region") as err:
        Region.parse(text)
    assert "\n" not in str(err.value)


def test_regions_outside_the_prompt_are_refused_naming_the_tracks(prompt):
    assert track_list(TOK, prompt) == "1 Choir Aahs, 2 Choir Aahs, 3 Voice Oohs, 4 Voice Oohs"
    with pytest.raises(ValueError, match=r"track 5 is out of range; the prompt's tracks are 1 Choir Aahs, 2 "):
        check_regions(TOK, prompt, [Region.parse("5:1-2")])
    with pytest.raises(ValueError, match=r"bars 3-5 are outside the prompt's 4 bars"):
        check_regions(TOK, prompt, [Region.parse("1:1"), Region.parse("2:3-5")])
    check_regions(TOK, prompt, [Region.parse("4:1-4")])


def test_check_infill_refuses_what_the_sampler_refuses(prompt):
    regions = [Region.parse("2:1-2"), Region.parse("4:3")]
    check_infill(TOK, GenerationRequest(prompt=prompt, bars=99, instruments=[6]), regions)  # both ignored
    with pytest.raises(ValueError, match="keeps the prompt's chords"):
        check_infill(TOK, GenerationRequest(prompt=prompt, chords=["C"]), regions)
    with pytest.raises(ValueError, match="track 5 is out of range"):
        check_infill(TOK, GenerationRequest(prompt=prompt), [Region.parse("5:1")])


def test_regenerate_needs_bars_of_the_prompt(prompt):
    with pytest.raises(ValueError, match="bar 4 of track 0"):
        check_request(TOK, GenerationRequest(prompt=prompt, regenerate=[(0, 4)]))
    with pytest.raises(ValueError, match="needs a prompt"):
        check_request(TOK, GenerationRequest(regenerate=[(0, 0)]))


def test_the_model_stops_once_the_last_region_bar_is_written(model, prompt, monkeypatch):
    from meloformer.decoder import IncrementalDecoder

    calls = []
    step = IncrementalDecoder.step
    monkeypatch.setattr(IncrementalDecoder, "step", lambda self, token: calls.append(self.length) or step(self, token))
    monkeypatch.setattr(infill_module, "end_before_repeats", lambda tok, tokens, track, bars: tokens)  # as sampled
    tokens = infill(model, TOK, GenerationRequest(prompt=prompt), [Region.parse("1:1")], seed=0)
    row = fill_row(TOK, tokens, 0, 0, 0)  # as generated
    region = len(TOK.parse(tokens).tracks[0][1][0])  # tokens written in the region, after its Bar
    bar = len(row) - 2 - region  # where the pass's Bar sits: then the region, then EOS
    # The prefill ends at that Bar; a step per token written in the region; the EOS that closes the pass is
    # sampled from the last step's logits.
    assert calls == list(range(bar + 1, bar + 1 + region))


def test_region_fit_keeps_the_range_and_leans_to_consonance_and_the_neighbours(prompt):
    """For the soprano's bars 2-3 (from 0: 1-2) of a 4-bar chorale: pitches outside the soprano's other notes
    are refused, consonance with the lowest other note sounding gets CONSONANCE_BIAS, and the first and last
    region bars lean to the notes just before and after; other tracks, bars and the conductor are left alone."""
    notes = TOK.note_table(prompt)
    soprano = notes[notes[:, TRACK] == 0]
    kept = soprano[~np.isin(soprano[:, BAR], [1, 2])]
    fit = infill_module.RegionFit(TOK, prompt, 1, {1, 2})
    pitch = slice(TOK.pitch0, TOK.pitch0 + 128)
    bias, allowed = fit(1, 5, 0)  # written in the fill pass, track 5
    low, high = kept[:, NOTE_COLUMNS.index("pitch")].min(), kept[:, NOTE_COLUMNS.index("pitch")].max()
    assert np.flatnonzero(allowed[pitch]).tolist() == list(range(low, high + 1))
    assert allowed[: TOK.pitch0].all()  # only pitches are limited
    onset = int(fit.bar_starts[1])
    others = notes[(notes[:, TRACK] != 0)]
    o, d, p = (NOTE_COLUMNS.index(c) for c in ("onset", "duration", "pitch"))
    bass = others[(others[:, o] <= onset) & (others[:, o] + others[:, d] > onset)][:, p].min()
    before = int(
        kept[kept[:, BAR] == 0][:, p][kept[kept[:, BAR] == 0][:, o] == kept[kept[:, BAR] == 0][:, o].max()].max()
    )
    expected = infill_module.CONSONANCE_BIAS * np.isin(np.abs(np.arange(128) - bass) % 12, (0, 3, 4, 7, 8, 9))
    expected -= infill_module.LEAP_PENALTY * np.maximum(np.abs(np.arange(128) - before) - 2, 0)
    assert np.allclose(bias[pitch], expected)
    assert fit(0, 5, 0) == (None, None) and fit(1, 1, 0) == (None, None) and fit(1, 0, 0) == (None, None)


def test_an_infilled_region_stays_in_the_tracks_range(model, prompt):
    """The sampler applies the fit: even an untrained model's region keeps to the track's own range."""
    regions = [Region.parse("1:2-3")]
    notes = TOK.note_table(prompt)
    kept = notes[(notes[:, TRACK] == 0) & ~in_regions(notes, regions)][:, NOTE_COLUMNS.index("pitch")]
    for seed in range(2):
        out = TOK.note_table(infill(model, TOK, GenerationRequest(prompt=prompt), regions, seed=seed))
        region = out[in_regions(out, regions)][:, NOTE_COLUMNS.index("pitch")]
        assert len(region) and kept.min() <= region.min() and region.max() <= kept.max()


def test_a_region_note_held_into_its_pitchs_next_onset_ends_there(tmp_path):
    """A regenerated note held into the next onset of its pitch after the region would make the written MIDI
    ambiguous (a reader pairs the note-offs either way) and change the kept note's length: it is shortened to
    the longest duration step that ends by it, and every bar outside the region keeps its tokens."""
    from _music import make_score

    score = make_score([(0, False, [(0, 8, 60, 100), (4, 1, 60, 100), (5, 1, 64, 100)])])  # C held over bar 2's C
    tokens = TOK.encode(score)
    assert sorted(map(tuple, TOK.note_table(tokens)[:, [BAR, 4, 5]].tolist())) == [
        (0, 60, 96),
        (1, 60, 12),
        (1, 64, 12),
    ]
    fixed = infill_module.end_before_repeats(TOK, tokens, 0, {0})
    notes = sorted(map(tuple, TOK.note_table(fixed)[:, [BAR, 4, 5]].tolist()))
    assert notes == [(0, 60, 48), (1, 60, 12), (1, 64, 12)]
    assert np.array_equal(TOK.parse(fixed).tracks[0][1][1], TOK.parse(tokens).tracks[0][1][1])  # bar 2 as it was
    TOK.decode_to_file(fixed, tmp_path / "fixed.mid")
    read = sorted((n.time, n.pitch, n.duration) for n in symusic.Score(str(tmp_path / "fixed.mid")).tracks[0].notes)
    assert read == [(0, 60, 48), (48, 60, 12), (60, 64, 12)]
    assert np.array_equal(infill_module.end_before_repeats(TOK, tokens, 0, {1}), tokens)  # bar 2 holds no such note
