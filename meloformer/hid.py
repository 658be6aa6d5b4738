"""HID encoding (Hierarchical Instrument-Decoupled), format version 2.

A piece is written track by track, and inside a track bar by bar (docs/design.md section 2)::

    BOS
    Track(p|drums)... (the ensemble: every instrument track's Track token, in track order)
    Track(conductor)  { Bar [TimeSig] [Chord] [Pos Tempo]... }  x n_bars
    Track(p|drums)    { Bar [Pos Pitch [Dur] [Vel]]... }       x n_bars   (per instrument track)
    EOS

The ensemble comes first so that the conductor's choices (meter, tempo, chords) are made knowing the
instruments (version 1 started with the conductor). Everything is computed on a quantised grid of
``resolution`` steps per quarter note: notes are quantised first and every derived quantity (bars, chords,
tempo bins) comes from the quantised notes, so encode -> decode -> encode is a fixed point. Decoded scores
use ``ticks_per_quarter == resolution``.

This module is numpy-only (plus symusic, and miditoolkit objects as an accepted input).
"""

from __future__ import annotations

import dataclasses
import math
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import symusic

from meloformer.files import atomic_path

FORMAT_VERSION = 2

CHORD_QUALITIES: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "sus4": (0, 5, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "hdim7": (0, 3, 6, 10),
}
PITCH_CLASS_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


class TokenKind(IntEnum):
    PAD = 0
    BOS = 1
    EOS = 2
    BAR = 3
    TRACK = 4
    TIMESIG = 5
    CHORD = 6
    POS = 7
    TEMPO = 8
    PITCH = 9
    DUR = 10
    VEL = 11


PAD, BOS, EOS, BAR = 0, 1, 2, 3
MAX_PITCHED_TRACKS = 15  # each pitched track gets its own MIDI channel; channel 9 is for drums
TRACK_CONDUCTOR, TRACK_DRUMS, TRACK_PROGRAM0 = 4, 5, 6  # Track_p is TRACK_PROGRAM0 + p


NOTE_COLUMNS = ("track", "bar", "pos", "onset", "pitch", "duration", "velocity")


class HIDError(ValueError):
    """A piece that cannot be encoded (or tokens that cannot be decoded); the message says why."""


@dataclasses.dataclass
class EncodeStats:
    notes: int = 0
    tracks: int = 0
    bars: int = 0
    tokens: int = 0
    dropped_controls: int = 0
    dropped_pitch_bends: int = 0
    pedal_extended_notes: int = 0


@dataclasses.dataclass
class _Track:
    program: int
    is_drum: bool
    notes: np.ndarray  # int64 [n, 4]: start tick, end tick, pitch, velocity
    pedals: list[tuple[int, int]]  # sustain-pedal down intervals in ticks
    controls: int  # controller events other than the sustain pedal
    pitch_bends: int


@dataclasses.dataclass
class _Music:
    tpq: int
    tracks: list[_Track]
    tempos: list[tuple[int, float]]  # (tick, quarter notes per minute)
    time_signatures: list[tuple[int, int, int]]  # (tick, numerator, denominator)


def read_midi(path: str | Path) -> symusic.Score:
    """Parse a MIDI file, refusing one whose chunks run past its end (a truncated download or copy: symusic
    0.5.x would read past its buffer there and return a random part of the piece), a type-2 file and one with
    0 ticks per quarter note (no time at all)."""
    data = Path(path).read_bytes()
    if data[:4] == b"MThd" and len(data) >= 14:
        if int.from_bytes(data[8:10], "big") == 2:  # symusic would play its sequential patterns all at once
            raise HIDError("cannot parse MIDI file: type 2 (sequential patterns) is not supported; save it as type 1")
        if int.from_bytes(data[12:14], "big") == 0:
            raise HIDError("cannot parse MIDI file: 0 ticks per quarter note")
        offset, chunks = 0, 1 + int.from_bytes(data[10:12], "big")  # the header, then its declared tracks
        for _ in range(chunks):
            end = offset + 8 + int.from_bytes(data[offset + 4 : offset + 8], "big")
            if offset + 8 > len(data) or end > len(data):
                raise HIDError(f"cannot parse MIDI file: truncated ({len(data)} bytes, a chunk runs to byte {end})")
            offset = end
    try:
        return symusic.Score.from_midi(data)
    except Exception as err:  # symusic raises plain RuntimeError/ValueError for broken files
        raise HIDError(f"cannot parse MIDI file: {err}") from err


def _duration_bins(resolution: int) -> np.ndarray:
    """Durations in grid steps: every step up to two quarters, then coarser up to eight whole notes."""
    r = resolution
    bins = list(range(1, 2 * r + 1))
    for step, upto in ((r // 4, 4 * r), (r // 2, 8 * r), (r, 16 * r), (2 * r, 32 * r)):
        bins += list(range(bins[-1] + step, upto + 1, step))
    return np.array(bins, dtype=np.int64)


class HIDTokenizer:
    """Tokenizer for the HID format; all settings are keyword arguments and round-trip via ``settings``."""

    def __init__(
        self,
        resolution: int = 12,
        max_bar_quarters: int = 16,
        tempo_bins: int = 48,
        tempo_min: float = 24.0,
        tempo_max: float = 320.0,
        velocity_bins: int = 32,
        max_tracks: int = 16,
        max_bars: int = 1024,
        max_tokens: int = 200_000,
        sustain_pedal: bool = True,
        format_version: int = FORMAT_VERSION,
    ) -> None:
        if format_version != FORMAT_VERSION:
            raise HIDError(
                f"HID format version {format_version} is not supported (this is {FORMAT_VERSION}): its tokens mean "
                "something else, so its data must be preprocessed again and its models trained again"
            )
        if resolution % 4 or resolution <= 0:
            raise HIDError(f"resolution must be a positive multiple of 4, got {resolution}")
        for name, value, low, high in (
            ("max_bar_quarters", max_bar_quarters, 1, 64),
            ("tempo_bins", tempo_bins, 2, 1024),
            ("velocity_bins", velocity_bins, 1, 128),
            ("max_tracks", max_tracks, 1, 129),
            ("max_bars", max_bars, 1, None),
            ("max_tokens", max_tokens, 2, None),
        ):
            if not isinstance(value, int) or value < low or (high is not None and value > high):
                bounds = f"{low}..{high}" if high is not None else f"at least {low}"
                raise HIDError(f"{name} must be an integer {bounds}, got {value!r}")
        if not 0 < tempo_min < tempo_max:
            raise HIDError(f"need 0 < tempo_min < tempo_max, got tempo_min={tempo_min}, tempo_max={tempo_max}")
        self.resolution = resolution
        self.max_bar_quarters = max_bar_quarters
        self.tempo_bins = tempo_bins
        self.tempo_min = float(tempo_min)
        self.tempo_max = float(tempo_max)
        self.velocity_bins = velocity_bins
        self.max_tracks = max_tracks
        self.max_bars = max_bars
        self.max_tokens = max_tokens
        self.sustain_pedal = sustain_pedal
        self.format_version = format_version
        self._build_vocab()

    # ------------------------------------------------------------------ vocabulary
    @property
    def settings(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "max_bar_quarters": self.max_bar_quarters,
            "tempo_bins": self.tempo_bins,
            "tempo_min": self.tempo_min,
            "tempo_max": self.tempo_max,
            "velocity_bins": self.velocity_bins,
            "max_tracks": self.max_tracks,
            "max_bars": self.max_bars,
            "max_tokens": self.max_tokens,
            "sustain_pedal": self.sustain_pedal,
            "format_version": self.format_version,
        }

    def vocab_settings(self) -> dict[str, Any]:
        """The settings that change what token ids mean: data and checkpoints must agree on these."""
        keys = ("resolution", "max_bar_quarters", "tempo_bins", "tempo_min", "tempo_max", "velocity_bins")
        return {k: self.settings[k] for k in keys} | {"format_version": self.format_version}

    def _build_vocab(self) -> None:
        r = self.resolution
        self.bar_positions = self.max_bar_quarters * r
        names = ["PAD", "BOS", "EOS", "Bar", "Track_conductor", "Track_drums"]
        kinds = [TokenKind.PAD, TokenKind.BOS, TokenKind.EOS, TokenKind.BAR, TokenKind.TRACK, TokenKind.TRACK]
        names += [f"Track_{p}" for p in range(128)]
        kinds += [TokenKind.TRACK] * 128

        def add(kind: TokenKind, labels: list[str]) -> int:
            start = len(names)
            names.extend(labels)
            kinds.extend([kind] * len(labels))
            return start

        self.time_signatures = [
            (n, d)
            for d in (1, 2, 4, 8, 16)
            for n in range(1, 33)
            if (n * 4 * r) % d == 0 and n * 4 * r // d <= self.bar_positions
        ]
        self.timesig0 = add(TokenKind.TIMESIG, [f"TimeSig_{n}/{d}" for n, d in self.time_signatures])
        self.chords = [(root, q) for root in range(12) for q in CHORD_QUALITIES]
        self.chord0 = add(TokenKind.CHORD, [f"Chord_{PITCH_CLASS_NAMES[r_]}{q}" for r_, q in self.chords])
        self.pos0 = add(TokenKind.POS, [f"Pos_{k}" for k in range(self.bar_positions)])
        self.tempo_values = np.exp(np.linspace(math.log(self.tempo_min), math.log(self.tempo_max), self.tempo_bins))
        self.tempo0 = add(TokenKind.TEMPO, [f"Tempo_{t:.1f}" for t in self.tempo_values])
        self.pitch0 = add(TokenKind.PITCH, [f"Pitch_{p}" for p in range(128)])
        self.duration_values = _duration_bins(r)
        self.dur0 = add(TokenKind.DUR, [f"Dur_{d}" for d in self.duration_values])
        step = 128 / self.velocity_bins
        self.velocity_values = np.array(
            [min(127, round(step * (i + 1)) - 1) for i in range(self.velocity_bins)], dtype=np.int64
        )
        self.vel0 = add(TokenKind.VEL, [f"Vel_{v}" for v in self.velocity_values])
        self.vocab: list[str] = names
        self.kinds = np.array(kinds, dtype=np.int8)
        self._timesig_index = {ts: i for i, ts in enumerate(self.time_signatures)}
        self._chord_templates = np.zeros((len(self.chords), 12), dtype=np.int64)
        for i, (root, quality) in enumerate(self.chords):
            self._chord_templates[i, [(root + k) % 12 for k in CHORD_QUALITIES[quality]]] = 1
        if len(names) > np.iinfo(np.uint16).max:
            raise HIDError("vocabulary does not fit in uint16")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def bar_length(self, numerator: int, denominator: int) -> int:
        """Grid positions in one bar of numerator/denominator."""
        return numerator * 4 * self.resolution // denominator

    # ------------------------------------------------------------------ input adapters
    def _load(self, x: Any) -> _Music:
        if isinstance(x, (str, Path)):
            x = read_midi(x)
        if isinstance(x, symusic.Score):
            return self._from_symusic(x)
        if type(x).__name__ == "MidiFile" and hasattr(x, "instruments"):
            return self._from_miditoolkit(x)
        raise TypeError(f"expected a path, symusic.Score or miditoolkit.MidiFile, got {type(x).__name__}")

    @staticmethod
    def _from_symusic(score: symusic.Score) -> _Music:
        if score.ttype != symusic.core.Tick:
            score = score.to("tick")
        tracks = []
        for t in score.tracks:
            arr = t.notes.numpy()
            notes = np.stack(
                [arr["time"], arr["time"] + arr["duration"], arr["pitch"], arr["velocity"]], axis=1
            ).astype(np.int64)
            pedals = [(p.time, p.time + p.duration) for p in t.pedals]
            controls = sum(1 for c in t.controls if c.number != 64)
            tracks.append(_Track(int(t.program), bool(t.is_drum), notes, pedals, controls, len(t.pitch_bends)))
        tempos = [(int(tm.time), float(tm.qpm)) for tm in score.tempos]
        sigs = [(int(ts.time), int(ts.numerator), int(ts.denominator)) for ts in score.time_signatures]
        return _Music(int(score.ticks_per_quarter), tracks, tempos, sigs)

    @staticmethod
    def _from_miditoolkit(midi: Any) -> _Music:
        tracks = []
        for inst in midi.instruments:
            notes = np.array([(n.start, n.end, n.pitch, n.velocity) for n in inst.notes], dtype=np.int64).reshape(-1, 4)
            pedals, down = [], None
            for cc in sorted((c for c in inst.control_changes if c.number == 64), key=lambda c: c.time):
                if cc.value >= 64 and down is None:
                    down = cc.time
                elif cc.value < 64 and down is not None:
                    pedals.append((down, cc.time))
                    down = None
            controls = sum(1 for c in inst.control_changes if c.number != 64)
            tracks.append(_Track(int(inst.program), bool(inst.is_drum), notes, pedals, controls, len(inst.pitch_bends)))
        tempos = [(int(t.time), 60_000_000 / round(60_000_000 / t.tempo)) for t in midi.tempo_changes]
        sigs = [(int(t.time), int(t.numerator), int(t.denominator)) for t in midi.time_signature_changes]
        return _Music(int(midi.ticks_per_beat), tracks, tempos, sigs)

    # ------------------------------------------------------------------ encoding
    def encode(self, x: Any) -> np.ndarray:
        """Encode a MIDI path, ``symusic.Score`` or ``miditoolkit.MidiFile`` into uint16 HID tokens."""
        return self.encode_with_stats(x)[0]

    def encode_with_stats(self, x: Any) -> tuple[np.ndarray, EncodeStats]:
        music = self._load(x)
        stats = EncodeStats()
        if music.tpq <= 0:
            raise HIDError(f"invalid ticks per quarter {music.tpq}")
        tracks = self._quantise_tracks(music, stats)
        if not tracks:
            raise HIDError("no notes")
        if len(tracks) > self.max_tracks:
            raise HIDError(f"{len(tracks)} instrument tracks exceed max_tracks={self.max_tracks}")
        pitched = sum(1 for _, is_drum, _ in tracks if not is_drum)
        if pitched > MAX_PITCHED_TRACKS:
            raise HIDError(
                f"{pitched} pitched tracks exceed max_tracks: MIDI has {MAX_PITCHED_TRACKS} non-drum channels"
            )
        last_onset = max(int(t[2][:, 0].max()) for t in tracks)
        bar_starts, bar_sigs = self._bars(music, last_onset)
        n_bars = len(bar_starts)
        if n_bars > self.max_bars:
            raise HIDError(f"{n_bars} bars exceed max_bars={self.max_bars}")
        bar_ends = np.append(bar_starts[1:], bar_starts[-1] + self.bar_length(*bar_sigs[-1]))

        track_tokens = [TRACK_DRUMS if is_drum else TRACK_PROGRAM0 + program for program, is_drum, _ in tracks]
        out: list[int] = [BOS, *track_tokens]
        out += self._conductor_tokens(music, tracks, bar_starts, bar_ends, bar_sigs)
        for track_token, (_, is_drum, notes) in zip(track_tokens, tracks):
            out.append(track_token)
            out += self.track_tokens(notes, is_drum, bar_starts)
        out.append(EOS)
        if len(out) > self.max_tokens:
            raise HIDError(f"{len(out)} tokens exceed max_tokens={self.max_tokens}")
        stats.tracks, stats.bars, stats.tokens = len(tracks), n_bars, len(out)
        stats.notes = sum(len(t[2]) for t in tracks)
        return np.array(out, dtype=np.uint16), stats

    def _quantise_tracks(self, music: _Music, stats: EncodeStats) -> list[tuple[int, bool, np.ndarray]]:
        """Fold the pedal, quantise to the grid, drop empty tracks, and sort tracks by priority."""
        keyed = []
        for index, t in enumerate(music.tracks):
            stats.dropped_controls += t.controls
            stats.dropped_pitch_bends += t.pitch_bends
            notes = t.notes.copy()
            notes = notes[(notes[:, 2] >= 0) & (notes[:, 2] < 128) & (notes[:, 3] > 0)]
            if len(notes) == 0:
                continue
            if self.sustain_pedal and t.pedals and not t.is_drum:
                stats.pedal_extended_notes += _fold_pedal(notes, t.pedals)
            start = np.rint(notes[:, 0] * self.resolution / music.tpq).astype(np.int64)
            end = np.rint(notes[:, 1] * self.resolution / music.tpq).astype(np.int64)
            start = np.maximum(start, 0)
            dur = self.duration_values[_nearest(self.duration_values, np.maximum(end - start, 1))]
            vel = self.velocity_values[_nearest(self.velocity_values, np.clip(notes[:, 3], 1, 127))]
            q = np.stack([start, notes[:, 2], dur, vel], axis=1)  # onset, pitch, duration, velocity
            if t.is_drum:
                q[:, 2] = 0
            q = np.unique(q, axis=0)  # sorted by onset, pitch, duration
            # One note per (onset, pitch) in a track, the longest: a channel cannot sound a pitch twice.
            last_of_group = np.append((q[1:, 0] != q[:-1, 0]) | (q[1:, 1] != q[:-1, 1]), True)
            q = q[last_of_group]
            keyed.append(((track_priority(t.program, t.is_drum), 0 if t.is_drum else t.program, index), q, t))
        keyed.sort(key=lambda item: item[0])
        return [(t.program, t.is_drum, q) for _, q, t in keyed]

    def _bars(self, music: _Music, last_onset: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Bar start steps and time signatures up to the bar holding ``last_onset``.

        As in MIDI, a time-signature event starts a new bar where it stands. A bar that it cuts short gets
        the time signature of its real length (a pickup of one eighth becomes a 1/8 bar), so bar lines come
        back exactly; where no signature has that length (less than a sixteenth), the change waits for the
        next bar line instead.
        """
        events = sorted(
            ((int(round(t * self.resolution / music.tpq)), (n, d)) for t, n, d in music.time_signatures),
            key=lambda e: e[0],
        )
        for _, (n, d) in events:
            if (n, d) not in self._timesig_index:
                raise HIDError(f"unsupported time signature {n}/{d}")
        changes = dict(events)  # the last event at a step wins
        sig = changes.pop(0, (4, 4)) if 0 in changes else next((s for t, s in events if t < 0), (4, 4))
        pending = sorted((t, s) for t, s in changes.items() if t > 0)
        starts, sigs, at = [], [], 0
        while at <= last_onset:
            length = self.bar_length(*sig)
            cut = pending[0][0] - at if pending and pending[0][0] < at + length else None
            short = self._signature_of_length(cut, sig[1]) if cut else None
            starts.append(at)
            sigs.append(short or sig)
            at += cut if short else length
            while pending and pending[0][0] <= at:
                sig = pending.pop(0)[1]
            if len(starts) > self.max_bars:
                raise HIDError(f"more than max_bars={self.max_bars} bars")
        return np.array(starts, dtype=np.int64), sigs

    def _signature_of_length(self, length: int, denominator: int) -> tuple[int, int] | None:
        """A supported time signature whose bar is ``length`` steps, preferring ``denominator``."""
        for d in (denominator, 4, 8, 16):
            if (length * d) % (4 * self.resolution) == 0 and (
                length * d // (4 * self.resolution),
                d,
            ) in self._timesig_index:
                return (length * d // (4 * self.resolution), d)
        return None

    def _conductor_tokens(self, music, tracks, bar_starts, bar_ends, bar_sigs) -> list[int]:
        tempo_events: dict[int, int] = {}
        for tick, qpm in sorted(music.tempos, key=lambda e: e[0]):
            step = max(0, int(round(tick * self.resolution / music.tpq)))
            tempo_events[step] = int(_nearest(np.log(self.tempo_values), np.array([math.log(max(qpm, 1e-3))]))[0])
        initial = tempo_events.pop(0, None)
        if initial is None:
            earlier = [b for s, b in tempo_events.items() if s < 0]
            initial = earlier[-1] if earlier else int(_nearest(self.tempo_values, np.array([120.0]))[0])
        changes = [(s, b) for s, b in sorted(tempo_events.items()) if 0 < s < bar_ends[-1]]  # later ones are dropped
        pitched = [q for _, is_drum, q in tracks if not is_drum]
        pitched = np.concatenate(pitched) if pitched else np.zeros((0, 4), dtype=np.int64)
        chords = self._detect_chords(pitched, bar_starts, bar_ends)
        changes_in_bar: dict[int, list[tuple[int, int]]] = {}
        for step, tempo_bin in changes:
            bar = int(np.searchsorted(bar_starts, step, side="right") - 1)
            changes_in_bar.setdefault(bar, []).append((step, tempo_bin))

        out, current, prev_sig = [TRACK_CONDUCTOR], initial, None
        for b, start in enumerate(bar_starts):
            out.append(BAR)
            if bar_sigs[b] != prev_sig:
                out.append(self.timesig0 + self._timesig_index[bar_sigs[b]])
                prev_sig = bar_sigs[b]
            if chords[b] >= 0:
                out.append(self.chord0 + int(chords[b]))
            if b == 0:
                out += [self.pos0, self.tempo0 + initial]
            for step, tempo_bin in changes_in_bar.get(b, ()):
                if tempo_bin != current:
                    out += [self.pos0 + int(step - start), self.tempo0 + tempo_bin]
                    current = tempo_bin
        return out

    def _detect_chords(self, notes: np.ndarray, bar_starts: np.ndarray, bar_ends: np.ndarray) -> np.ndarray:
        """Chord index per bar (-1 for a bar with no pitched onset) from non-drum notes with onset in the bar.

        Template matching on duration-weighted pitch classes (durations clipped at the bar end); the root must
        sound; ties go to the smaller template, then to the lower root. Integer arithmetic keeps it exact.
        """
        n_bars = len(bar_starts)
        bar_of = np.searchsorted(bar_starts, notes[:, 0], side="right") - 1
        weight = np.minimum(notes[:, 2], bar_ends[bar_of] - notes[:, 0])
        pcs = np.bincount(bar_of * 12 + notes[:, 1] % 12, weights=weight, minlength=n_bars * 12)
        pcs = pcs.reshape(n_bars, 12).astype(np.int64)
        hit = pcs @ self._chord_templates.T  # [bars, chords]
        score = (2 * hit - pcs.sum(axis=1, keepdims=True)) * 16 - self._chord_templates.sum(axis=1)
        roots = np.array([root for root, _ in self.chords])
        score = np.where(pcs[:, roots] > 0, score, np.iinfo(np.int64).min)
        return np.where(pcs.sum(axis=1) > 0, score.argmax(axis=1), -1)

    def track_tokens(self, notes: np.ndarray, is_drum: bool, bar_starts: np.ndarray) -> list[int]:
        """The bars of one track (each opened by ``Bar``) from its quantised notes ``[onset, pitch, duration,
        velocity]`` in grid steps, sorted by onset then pitch; ``bar_starts`` are the bars' first grid steps."""
        out = []
        bar_of = np.searchsorted(bar_starts, notes[:, 0], side="right") - 1
        splits = np.searchsorted(bar_of, np.arange(len(bar_starts) + 1))
        dur_index = _nearest(self.duration_values, np.maximum(notes[:, 2], 1))
        vel_index = _nearest(self.velocity_values, notes[:, 3])
        for b in range(len(bar_starts)):
            out.append(BAR)
            pos = dur = vel = None
            for i in range(splits[b], splits[b + 1]):
                p = int(notes[i, 0] - bar_starts[b])
                if p != pos:
                    out.append(self.pos0 + p)
                    pos = p
                out.append(self.pitch0 + int(notes[i, 1]))
                if not is_drum and dur_index[i] != dur:
                    dur = dur_index[i]
                    out.append(self.dur0 + int(dur))
                if vel_index[i] != vel:
                    vel = vel_index[i]
                    out.append(self.vel0 + int(vel))
        return out

    # ------------------------------------------------------------------ decoding
    def parse(self, tokens: np.ndarray, partial: bool = False) -> Piece:
        """Split tokens into conductor and track bars, checking every bar's ``BarSyntax``; HIDError names the place.

        ``partial``: a piece still being written, whose tracks so far are the first ones of its ensemble."""
        return Piece.parse(self, np.asarray(tokens), partial)

    def decode(self, tokens: np.ndarray) -> symusic.Score:
        """Tokens -> ``symusic.Score`` with ``ticks_per_quarter == resolution``; chords become markers."""
        piece = self.parse(tokens)
        score = symusic.Score(self.resolution)
        sigs, tempos, chords = piece.conductor_events(self)
        bar_starts = piece.bar_starts(self)
        for b, (n, d) in sigs:
            score.time_signatures.append(symusic.TimeSignature(int(bar_starts[b]), n, d))
        for b, p, t in tempos:
            score.tempos.append(symusic.Tempo(int(bar_starts[b] + p), qpm=float(self.tempo_values[t])))
        for b, c in chords:
            root, quality = self.chords[c]
            score.markers.append(symusic.TextMeta(int(bar_starts[b]), PITCH_CLASS_NAMES[root] + quality))
        notes = self.note_table(piece)
        for number, (track_token, _) in enumerate(piece.tracks):
            is_drum = track_token == TRACK_DRUMS
            program = 0 if is_drum else track_token - TRACK_PROGRAM0
            name = "Drums" if is_drum else f"Track {number + 1} (program {program})"
            track = symusic.Track(name=name, program=program, is_drum=is_drum)
            for row in notes[notes[:, NOTE_COLUMNS.index("track")] == number]:
                _, _, _, onset, pitch, duration, velocity = row.tolist()
                track.notes.append(symusic.Note(onset, duration, pitch, velocity))
            score.tracks.append(track)
        return score

    def note_table(self, tokens_or_piece: np.ndarray | Piece) -> np.ndarray:
        """Every note as a row of ``NOTE_COLUMNS`` (track, bar, pos, onset, pitch, duration, velocity).

        ``track`` counts instrument tracks from 0; times are grid steps; drums get ``resolution // 4``.
        """
        piece = tokens_or_piece if isinstance(tokens_or_piece, Piece) else self.parse(tokens_or_piece)
        bar_starts = piece.bar_starts(self)
        tables = [np.zeros((0, len(NOTE_COLUMNS)), dtype=np.int64)]
        for number, (track_token, bars) in enumerate(piece.tracks):
            bar = np.repeat(np.arange(len(bars)), [len(b) for b in bars])
            pos, pitch, dur, vel, at = self._notes(np.concatenate([np.zeros(0, np.int64), *bars]), bar)
            if track_token == TRACK_DRUMS:
                length = np.full(len(pitch), self.resolution // 4)
            else:
                length = self.duration_values[dur].astype(np.int64)
            b = bar[at]
            columns = (
                np.full(len(pitch), number),
                b,
                pos,
                bar_starts[b] + pos,
                pitch,
                length,
                self.velocity_values[vel],
            )
            tables.append(np.stack(columns, axis=1).astype(np.int64))
        return np.concatenate(tables)

    def decode_to_file(self, tokens: np.ndarray, path: str | Path) -> None:
        """Write the MIDI file of ``tokens`` (whole, or not at all)."""
        score = self.decode(tokens)
        with atomic_path(path) as tmp:
            score.dump_midi(str(tmp))

    def bar_notes(self, bar: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(position, pitch, duration bin, velocity bin) of every note in one bar's tokens (after ``Bar``).

        A note's ``Dur``/``Vel`` follow its ``Pitch``; when absent, the previous note's values carry over.
        """
        bar = np.asarray(bar, dtype=np.int64)
        pos, pitch, dur, vel, _ = self._notes(bar, np.zeros(len(bar), dtype=np.int64))
        return list(zip(pos.tolist(), pitch.tolist(), dur.tolist(), vel.tolist()))

    def _notes(self, tokens: np.ndarray, bar: np.ndarray) -> tuple[np.ndarray, ...]:
        """Position, pitch, duration bin, velocity bin and token index of each note in instrument bars'
        ``tokens`` (``Bar`` tokens left out), ``bar`` numbering the bar of each token. Within a bar a note
        without its own ``Pos``, ``Dur`` or ``Vel`` takes the latest one before it (0 before any)."""
        kinds = self.kinds[tokens]
        index = np.arange(len(tokens))
        at = np.flatnonzero(kinds == TokenKind.PITCH)
        # Dur follows its Pitch; Vel follows the Pitch or its Dur.
        next_kind = np.append(kinds, [TokenKind.PAD, TokenKind.PAD])
        own_dur = np.where(next_kind[at + 1] == TokenKind.DUR, at + 1, -1)
        vel_at = at + 1 + (own_dur >= 0)
        own_vel = np.where(next_kind[vel_at] == TokenKind.VEL, vel_at, -1)

        def latest(source: np.ndarray, where: np.ndarray, offset: int) -> np.ndarray:
            """The value (token - offset) at the latest ``source`` index at or before each of ``where`` in
            the same bar, else 0."""
            last = np.maximum.accumulate(source)
            found = (last >= 0) & (bar[np.maximum(last, 0)] == bar[where])
            return np.where(found, tokens[np.maximum(last, 0)] - offset, 0)

        pos = latest(np.maximum.accumulate(np.where(kinds == TokenKind.POS, index, -1))[at], at, self.pos0)
        dur = latest(own_dur, at, self.dur0)
        vel = latest(own_vel, at, self.vel0)
        return pos, tokens[at] - self.pitch0, dur, vel, at

    def describe(self, tokens: np.ndarray) -> list[str]:
        return [self.vocab[int(t)] for t in tokens]


@dataclasses.dataclass
class Piece:
    """A parsed HID token sequence: per bar, the tokens after each ``Bar`` token."""

    conductor: list[np.ndarray]
    tracks: list[tuple[int, list[np.ndarray]]]  # (Track token, bars)

    @property
    def n_bars(self) -> int:
        return len(self.conductor)

    @classmethod
    def parse(cls, tok: HIDTokenizer, tokens: np.ndarray, partial: bool = False) -> Piece:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise HIDError(f"tokens must be one 1-D array of integer ids, got {tokens.dtype} of shape {tokens.shape}")
        tokens = tokens.astype(np.int64)
        if len(tokens) < 2:
            raise HIDError("a piece needs at least BOS, its ensemble and a conductor track")
        if tokens.min() < 0 or tokens.max() >= tok.vocab_size:
            raise HIDError(f"token id out of range 0..{tok.vocab_size - 1}")
        if tokens[0] != BOS:
            raise HIDError(f"token 0 is {tok.vocab[tokens[0]]}, expected BOS")
        end = len(tokens)
        eos = np.flatnonzero(tokens == EOS)
        if len(eos):
            end = int(eos[0])
        head = tokens[1:end]
        opens_track = (tok.kinds[head] == TokenKind.TRACK) & (head != TRACK_CONDUCTOR)
        n_ensemble = int(np.argmin(opens_track)) if not opens_track.all() else len(head)
        if n_ensemble == len(head) or head[n_ensemble] != TRACK_CONDUCTOR:
            raise HIDError(
                f"token {1 + n_ensemble} must be Track_conductor: a piece opens with BOS, the Track tokens of its "
                "instruments, then the conductor track"
            )
        ensemble = head[:n_ensemble].tolist()
        body = head[n_ensemble:]
        kinds = tok.kinds[body]
        track_at = np.flatnonzero(kinds == TokenKind.TRACK)
        if (body[track_at[1:]] == TRACK_CONDUCTOR).any():
            raise HIDError("a second conductor track")
        bad = np.isin(kinds, (TokenKind.PAD, TokenKind.BOS))
        if bad.any():
            i = int(np.flatnonzero(bad)[0]) + 1 + n_ensemble
            raise HIDError(f"token {i} ({tok.vocab[tokens[i]]}) cannot appear inside a piece")
        starts = list(track_at + 1 + n_ensemble) + [end]  # where each track's Track token stands, then the end
        parsed = []
        for first, stop in zip(starts, starts[1:]):
            track_token = int(tokens[first])
            if stop > first + 1 and tokens[first + 1] != BAR:
                raise HIDError(f"token {first + 1} ({tok.vocab[tokens[first + 1]]}) must be Bar after a Track token")
            bar_at = list(first + 1 + np.flatnonzero(tokens[first + 1 : stop] == BAR)) + [stop]
            for number, (a, b) in enumerate(zip(bar_at, bar_at[1:])):
                _check_bar(tok, tokens, a, b, track_token, number)
            parsed.append((track_token, [tokens[a + 1 : b] for a, b in zip(bar_at, bar_at[1:])]))
        conductor = parsed[0][1]
        if not conductor:
            raise HIDError("the conductor track has no bars")
        for number, (_, bars) in enumerate(parsed[1:], start=1):
            if len(bars) != len(conductor):
                raise HIDError(f"track {number} has {len(bars)} bars, the conductor has {len(conductor)}")
        written = [track_token for track_token, _ in parsed[1:]]
        if written != (ensemble[: len(written)] if partial else ensemble):
            names = ", ".join(tok.vocab[t] for t in ensemble) or "no instrument"
            raise HIDError(f"the tracks ({', '.join(tok.vocab[t] for t in written)}) are not the ensemble ({names})")
        return cls(conductor, parsed[1:])

    def conductor_events(self, tok: HIDTokenizer):
        """(bar, time signature) changes, (bar, pos, tempo bin) changes and (bar, chord index) per bar."""
        sigs, tempos, chords = [], [], []
        for b, bar in enumerate(self.conductor):
            pos = None
            for t in bar.tolist():
                kind = tok.kinds[t]
                if kind == TokenKind.TIMESIG:
                    sigs.append((b, tok.time_signatures[t - tok.timesig0]))
                elif kind == TokenKind.CHORD:
                    chords.append((b, t - tok.chord0))
                elif kind == TokenKind.POS:
                    pos = t - tok.pos0
                elif kind == TokenKind.TEMPO:
                    tempos.append((b, pos, t - tok.tempo0))
        return sigs, tempos, chords

    def bar_lengths(self, tok: HIDTokenizer) -> np.ndarray:
        """Grid positions in each bar, from the conductor's time signatures."""
        sigs = dict(self.conductor_events(tok)[0])
        lengths, sig = [], None
        for b in range(self.n_bars):
            sig = sigs.get(b, sig)
            lengths.append(tok.bar_length(*sig))
        return np.array(lengths, dtype=np.int64)

    def bar_starts(self, tok: HIDTokenizer) -> np.ndarray:
        lengths = self.bar_lengths(tok)
        return np.cumsum(lengths) - lengths


_KIND_LABELS = {
    TokenKind.TIMESIG: "TimeSig",
    TokenKind.CHORD: "Chord",
    TokenKind.POS: "Pos",
    TokenKind.TEMPO: "Tempo",
    TokenKind.PITCH: "Pitch",
    TokenKind.DUR: "Dur",
    TokenKind.VEL: "Vel",
}
_CONDUCTOR_NEXT = {  # kind of the latest token -> kinds that may follow it in a conductor bar
    TokenKind.BAR: (TokenKind.TIMESIG, TokenKind.CHORD, TokenKind.POS),
    TokenKind.TIMESIG: (TokenKind.CHORD, TokenKind.POS),
    TokenKind.CHORD: (TokenKind.POS,),
    TokenKind.POS: (TokenKind.TEMPO,),
    TokenKind.TEMPO: (TokenKind.POS,),
}
_NOTE_NEXT = {  # the same in an instrument bar
    TokenKind.BAR: (TokenKind.POS,),
    TokenKind.POS: (TokenKind.PITCH,),
    TokenKind.PITCH: (TokenKind.DUR, TokenKind.VEL, TokenKind.PITCH, TokenKind.POS),
    TokenKind.DUR: (TokenKind.VEL, TokenKind.PITCH, TokenKind.POS),
    TokenKind.VEL: (TokenKind.PITCH, TokenKind.POS),
}


class BarSyntax:
    """The syntax of one bar, followed token by token (docs/design.md section 2).

    A conductor bar is ``[TimeSig] [Chord] [Pos Tempo]...``; the conductor's bar 0 starts with a ``TimeSig``
    and sets the tempo at ``Pos_0``. An instrument bar is ``[Pos Pitch [Dur] [Vel]]...``; its first note
    carries ``Dur`` (not on drums) and ``Vel``. Positions rise. ``Piece.parse`` checks pieces with it and
    ``meloformer.grammar`` builds the sampler's masks from it, so these rules exist once.
    """

    def __init__(self, tok: HIDTokenizer, track_token: int, first_bar: bool) -> None:
        self.tok = tok
        self.conductor = track_token == TRACK_CONDUCTOR
        self.drums = track_token == TRACK_DRUMS
        self.opens_piece = self.conductor and first_bar  # must set the time signature and the tempo
        self.last = TokenKind.BAR  # kind of the latest token
        self.pos = -1  # the latest position
        self.has_dur = self.has_vel = False

    def next_kinds(self) -> tuple[TokenKind, ...]:
        """Token kinds that may come next (a ``Pos`` only within ``positions``)."""
        if self.conductor and self.opens_piece and self.last == TokenKind.BAR:
            return (TokenKind.TIMESIG,)
        if self.conductor:
            return _CONDUCTOR_NEXT[self.last]
        if self.last in (TokenKind.PITCH, TokenKind.DUR) and not self.has_vel:  # the bar's first note
            return (TokenKind.DUR,) if not (self.drums or self.has_dur) else (TokenKind.VEL,)
        return tuple(k for k in _NOTE_NEXT[self.last] if not (self.drums and k == TokenKind.DUR))

    def positions(self, bar_length: int) -> range:
        """The values a next ``Pos`` may take in a bar of ``bar_length`` grid steps."""
        return range(1) if self.before_first_tempo else range(self.pos + 1, bar_length)

    @property
    def before_first_tempo(self) -> bool:
        """Bar 0 of the conductor before its ``Pos_0``: the bar must still set the piece's tempo."""
        return self.opens_piece and self.pos < 0

    @property
    def may_end(self) -> bool:
        """May a ``Bar``, ``Track`` or ``EOS`` come next?"""
        if self.conductor:
            return self.last != TokenKind.POS and not self.before_first_tempo
        return self.last == TokenKind.BAR or (self.last != TokenKind.POS and self.has_vel)

    def tokens_to_end(self) -> int:
        """The fewest tokens still needed before the bar may end."""
        if self.conductor:
            if self.before_first_tempo:
                return 3 if self.last == TokenKind.BAR else 2  # (TimeSig) Pos_0 Tempo
            return int(self.last == TokenKind.POS)
        dur, vel = int(not (self.drums or self.has_dur)), int(not self.has_vel)
        return {TokenKind.POS: 1 + dur + vel, TokenKind.PITCH: dur + vel, TokenKind.DUR: vel}.get(self.last, 0)

    def advance(self, token: int) -> None:
        """Take ``token`` as the bar's next one (the caller has checked that it may come)."""
        self.last = TokenKind(self.tok.kinds[token])
        if self.last == TokenKind.POS:
            self.pos = token - self.tok.pos0
        self.has_dur |= self.last == TokenKind.DUR
        self.has_vel |= self.last == TokenKind.VEL

    def expected(self) -> str:
        """What may come next, in words, for error messages."""
        words = [_KIND_LABELS[k] for k in self.next_kinds()]
        if "Pos" in words and self.before_first_tempo:
            words[words.index("Pos")] = "Pos_0"
        elif "Pos" in words and self.pos >= 0:
            words[words.index("Pos")] = f"a Pos after Pos_{self.pos}"
        if self.may_end:
            words.append("the bar's end")
        listed = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
        why = ""
        if self.before_first_tempo:
            why = " (bar 0 of the conductor starts with a time signature and sets the tempo at Pos_0)"
        elif not self.conductor and self.last in (TokenKind.PITCH, TokenKind.DUR) and not self.has_vel:
            why = " (the first note of a bar carries its duration and velocity)"
        return listed + why


def _check_bar(tok: HIDTokenizer, tokens: np.ndarray, start: int, end: int, track_token: int, number: int) -> None:
    """Check ``tokens[start:end]``, bar ``number`` of a track with its ``Bar`` token at ``start``.

    Positions are checked to rise, not to lie inside the bar's length: parsing has always allowed that.
    """
    syntax = BarSyntax(tok, track_token, first_bar=number == 0)
    where = f"bar {number} of {tok.vocab[track_token]}"
    bar = tokens[start + 1 : end]
    for i, t, kind in zip(range(start + 1, end), bar.tolist(), tok.kinds[bar].tolist()):
        if kind not in syntax.next_kinds() or (
            kind == TokenKind.POS and t - tok.pos0 not in syntax.positions(tok.bar_positions)
        ):
            raise HIDError(f"token {i} ({tok.vocab[t]}) is out of place in {where}: expected {syntax.expected()}")
        syntax.advance(t)
    if not syntax.may_end:
        ending = (
            f"token {end} ({tok.vocab[tokens[end]]}) ends {where}"
            if end < len(tokens)
            else f"the tokens stop in {where}"
        )
        raise HIDError(f"{ending} too early: expected {syntax.expected()}")


def _nearest(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest value in sorted ``values`` for each x (ties go to the lower value)."""
    x = np.asarray(x)
    hi = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
    lo = hi - 1
    return np.where(np.abs(x - values[lo]) <= np.abs(values[hi] - x), lo, hi)


def _fold_pedal(notes: np.ndarray, pedals: list[tuple[int, int]]) -> int:
    """Extend notes released while the sustain pedal is down to the pedal's release (in place).

    A note is never extended past the next onset of the same pitch. Returns how many notes grew.
    """
    pedals_arr = np.array(sorted(pedals), dtype=np.int64).reshape(-1, 2)
    order = np.lexsort((notes[:, 0], notes[:, 2]))
    grown = 0
    for rank, i in enumerate(order):
        end = notes[i, 1]
        k = np.searchsorted(pedals_arr[:, 0], end, side="right") - 1
        if k < 0 or not (pedals_arr[k, 0] <= end < pedals_arr[k, 1]):
            continue
        new_end = pedals_arr[k, 1]
        if rank + 1 < len(order):
            j = order[rank + 1]
            if notes[j, 2] == notes[i, 2]:
                new_end = min(new_end, max(notes[j, 0], end))
        if new_end > end:
            notes[i, 1] = new_end
            grown += 1
    return grown


def track_priority(program: int, is_drum: bool) -> int:
    """Drums, then bass, then chords/pads (keyboards, organs, guitars, ensembles, pads), then melodic lines."""
    if is_drum:
        return 0
    if 32 <= program <= 39:
        return 1
    if program <= 31 or 48 <= program <= 55 or 88 <= program <= 95:
        return 2
    return 3
