"""HID round trips on every file of the bundled demo corpus (real music, several instruments)."""

from __future__ import annotations

from collections import defaultdict

import miditoolkit
import mido
import numpy as np
import pytest
import symusic

from _music import demo_files, downbeats
from meloformer.edits import crop_bars
from meloformer.hid import TRACK_DRUMS, HIDTokenizer, track_priority
from meloformer.layout import layout

FILES = demo_files()
TOK = HIDTokenizer(sustain_pedal=False)  # compare against the raw notes of the file
R = TOK.resolution


def test_demo_corpus_is_there_and_multi_instrument():
    assert len(FILES) >= 100
    track_counts = [len([t for t in symusic.Score(str(f)).tracks if t.note_num()]) for f in FILES]
    assert sum(c >= 4 for c in track_counts) >= 30
    programs = {t.program for f in FILES for t in symusic.Score(str(f)).tracks}
    assert len(programs) >= 5


@pytest.fixture(scope="module")
def encoded():
    return {f: TOK.encode(f) for f in FILES}


def _quarters(ticks, tpq):
    return np.asarray(ticks, dtype=np.float64) / tpq


def test_encode_decode_encode_is_a_fixed_point(encoded):
    for path, tokens in encoded.items():
        assert np.array_equal(TOK.encode(TOK.decode(tokens)), tokens), path


def test_every_note_comes_back_within_grid_and_bins(encoded):
    total = kept = collapsed = 0
    for path, tokens in encoded.items():
        original = symusic.Score(str(path))
        tpq = original.ticks_per_quarter
        tracks = [(i, t) for i, t in enumerate(original.tracks) if t.note_num()]
        tracks.sort(key=lambda it: (track_priority(it[1].program, it[1].is_drum), it[1].program, it[0]))
        decoded = TOK.decode(tokens)
        assert len(decoded.tracks) == len(tracks), path
        for (_, orig), dec in zip(tracks, decoded.tracks):
            assert (dec.program, dec.is_drum) == ((0 if orig.is_drum else orig.program), orig.is_drum), path
            groups = defaultdict(list)
            for n in orig.notes:
                groups[(int(np.rint(n.time * R / tpq)), n.pitch)].append(n)
            dec_groups = defaultdict(list)
            for n in dec.notes:
                dec_groups[(n.time, n.pitch)].append(n)
            assert set(dec_groups) == set(groups), path
            for key, notes in dec_groups.items():
                originals = groups[key]
                assert len(notes) <= len(originals)
                for n in notes:
                    onset_error = min(abs(n.time / R - o.time / tpq) for o in originals)
                    assert onset_error <= 0.5 / R + 1e-9, (path, key)
                    assert min(abs(n.velocity - o.velocity) for o in originals) <= 2, (path, key)
                    if not dec.is_drum:
                        bins = TOK.duration_values
                        d = int(np.searchsorted(bins, n.duration))
                        gap = max(bins[min(d + 1, len(bins) - 1)] - bins[d], bins[d] - bins[max(d - 1, 0)])
                        longest = TOK.duration_values[-1]  # longer notes are capped at the last bin
                        error = min(abs(n.duration - min(o.duration * R / tpq, longest)) for o in originals)
                        assert error <= 1 + gap / 2, (path, key, n.duration)
                kept += len(notes)
                collapsed += len(originals) - len(notes)
            total += orig.note_num()
    # Every note survives except notes doubling another of the same track at the same onset and pitch.
    assert kept + collapsed == total
    assert collapsed / total < 0.005, (collapsed, total)


def test_tempo_and_time_signature_maps_come_back(encoded):
    for path, tokens in encoded.items():
        original = symusic.Score(str(path))
        tpq = original.ticks_per_quarter
        decoded = TOK.decode(tokens)
        end = decoded.end() / R

        def in_force(events, t, time_of, value_of):
            earlier = [value_of(e) for e in events if time_of(e) <= t + 1e-9]
            return earlier[-1] if earlier else None

        for tempo in original.tempos:
            t = round(tempo.time * R / tpq) / R
            if t >= end:
                continue
            expected = in_force(original.tempos, t, lambda e, q=tpq: round(e.time * R / q) / R, lambda e: e.qpm)
            got = in_force(decoded.tempos, t, lambda e: e.time / R, lambda e: e.qpm)
            assert abs(np.log(got / expected)) <= np.log(TOK.tempo_values[1] / TOK.tempo_values[0]) / 2 + 1e-3, path
        # The meter map: every bar line of the original (as a MIDI reader counts them) comes back exactly.
        # Up to the first bar that no time signature can hold: off the position grid, or shorter than a
        # sixteenth (music21 writes a few 1/32-long bars where it splits a measure at a repeat).
        steps = [b * R / tpq for b in downbeats(original)]
        odd = [i for i, s in enumerate(steps) if abs(s - round(s)) > 1e-6 or (i and round(s - steps[i - 1]) % (R // 4))]
        bar_lines = [round(s) / R for s in steps[: odd[0] if odd else len(steps)]]
        decoded_lines = [b / R for b in downbeats(decoded)]
        expected = [b for b in bar_lines if b < decoded_lines[-1] + 1e-9]
        assert decoded_lines[: len(expected)] == expected, path
        for ts in decoded.time_signatures:  # and the time signature of each full bar
            t = ts.time / R
            in_original = [(s.numerator, s.denominator) for s in original.time_signatures if s.time / tpq <= t + 1e-9]
            if TOK.bar_length(ts.numerator, ts.denominator) == TOK.bar_length(*in_original[-1]):
                assert (ts.numerator, ts.denominator) == in_original[-1], (path, t)


def test_each_pitched_track_keeps_its_program_on_its_own_channel(encoded, tmp_path):
    for path, tokens in list(encoded.items())[::10]:
        out = tmp_path / "decoded.mid"
        TOK.decode_to_file(tokens, out)
        programs, channels = [], []
        for track in mido.MidiFile(out).tracks:
            notes = {m.channel for m in track if m.type == "note_on"}
            if notes:
                channels.append(notes)
                programs.append([m.program for m in track if m.type == "program_change"])
        original = sorted(t.program for t in symusic.Score(str(path)).tracks if t.note_num() and not t.is_drum)
        assert sorted(p[0] for p in programs) == original, path
        assert all(len(c) == 1 for c in channels) and len({min(c) for c in channels}) == len(channels), path


def test_symusic_and_miditoolkit_inputs_give_identical_tokens(encoded):
    for path, tokens in encoded.items():
        assert np.array_equal(TOK.encode(miditoolkit.MidiFile(str(path))), tokens), path


def _crop_music(score: symusic.Score, bar_starts: np.ndarray, b0: int, b1: int) -> symusic.Score:
    """Cut bars [b0, b1) out of a decoded score (ticks == grid steps), carrying meter and tempo in force."""
    start, stop = int(bar_starts[b0]), int(bar_starts[b1]) if b1 < len(bar_starts) else 1 << 40
    out = symusic.Score(score.ticks_per_quarter)
    sigs = [ts for ts in score.time_signatures if ts.time <= start][-1:] + [
        ts for ts in score.time_signatures if start < ts.time < stop
    ]
    for ts in sigs:
        out.time_signatures.append(symusic.TimeSignature(max(ts.time - start, 0), ts.numerator, ts.denominator))
    tempos = [t for t in score.tempos if t.time <= start][-1:] + [t for t in score.tempos if start < t.time < stop]
    for t in tempos:
        out.tempos.append(symusic.Tempo(max(t.time - start, 0), qpm=t.qpm))
    for track in score.tracks:
        new = symusic.Track(program=track.program, is_drum=track.is_drum)
        for n in track.notes:
            if start <= n.time < stop:
                new.notes.append(symusic.Note(n.time - start, n.duration, n.pitch, n.velocity))
        out.tracks.append(new)
    return out


def test_crop_bars_equals_cropping_the_music_first(encoded):
    rng = np.random.default_rng(0)
    checked = 0
    for path, tokens in encoded.items():
        piece = TOK.parse(tokens)
        bar_starts = piece.bar_starts(TOK)
        score = TOK.decode(tokens)
        for _ in range(4):
            b0 = int(rng.integers(0, piece.n_bars))
            b1 = int(rng.integers(b0 + 1, piece.n_bars + 1))
            # The music-first crop drops silent tracks and trailing silent bars; pick windows where
            # every track plays and the last bar has an onset, so both crops describe the same music.
            if not all(any(len(bar) for bar in bars[b0:b1]) for _, bars in piece.tracks):
                continue
            if not any(len(bars[b1 - 1]) for _, bars in piece.tracks):
                continue
            cropped = crop_bars(TOK, tokens, b0, b1)
            assert np.array_equal(cropped, TOK.encode(_crop_music(score, bar_starts, b0, b1))), (path, b0, b1)
            checked += 1
    assert checked >= 50


def test_layout_gives_every_track_n_bars_and_consistent_segments(encoded):
    for path, tokens in encoded.items():
        lay = layout(tokens, TOK.kinds)
        piece = TOK.parse(tokens)
        n_tracks = 1 + len(piece.tracks)
        assert lay.track.max() == n_tracks - 1, path
        for t in range(n_tracks):
            bars = lay.bar[(lay.track == t) & (tokens == 3)]
            assert bars.tolist() == list(range(piece.n_bars)), (path, t)
        assert lay.num_segments() == n_tracks * piece.n_bars, path
        starts = np.flatnonzero(tokens == 3)
        assert lay.segment[starts].tolist() == list(range(len(starts))), path
        drums = (lay.track_token == TRACK_DRUMS) & (lay.kind == 10)
        assert not drums.any(), path  # no Dur in drum tracks
