"""Key and dynamics as people write them -> what the grammar may allow (``meloformer.grammar``), and the
velocities of a written piece.

A key is a tonic and a mode: ``D minor``, ``Dm``, ``F# major``, ``Bb`` (major). Its pitch classes are the
major scale, or for minor the natural minor scale plus the raised seventh (the leading tone of the harmonic
minor, which minor-key music such as the chorales uses at every cadence). In a key, pitched notes take only
those pitch classes and the conductor's chords only those whose tones all lie in them.

A forced chord progression (``--chords``) binds the notes of its bars (``ChordBinding``): chord tones are
favoured, and the bass track takes the chord's root at the downbeat.

Voice-leading (``--voice_leading``, ``VoiceLeading``) keeps each track from crossing the voices written
before it and from moving in parallel fifths or octaves with them, as part-writing rules ask. It is on by
default for a choir (``sung``: every track a voice), whose parts those rules were written for.

A form (``--form AABA``) is a letter per phrase of equal length; a phrase whose letter came before restates
that phrase bar by bar, each track drawn towards its own earlier bar (``FormRepeat``). Without a form, a bar
that the model begins as a copy of an earlier bar of its track is drawn to end as one (``Restatement``): the
model chooses what to repeat, the sampler keeps it from drifting off halfway.

Dynamics are velocity ranges ``LO-HI`` (MIDI 1-127), spread evenly over the bars: ``40-70`` holds for every
bar, ``50-70 70-100 50-70`` is an arch in thirds. They shape the velocities once the piece is written
(``shape_dynamics``), not while it is sampled: forcing velocities that the training data never had changes which
notes the model writes (docs/results.md, "Dynamics after sampling").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from meloformer.chords import ACCIDENTALS, LETTERS
from meloformer.features import line, sounding
from meloformer.hid import BAR, CHORD_QUALITIES, TRACK_CONDUCTOR, TRACK_DRUMS, TRACK_PROGRAM0, HIDTokenizer, TokenKind
from meloformer.layout import layout
from meloformer.metrics import COL
from meloformer.part_writing import parallel_moves

# A first sample from what the shipped model knows best (the chorales): four voices, with an arch of dynamics
# (its own velocities barely move: the training data's are nearly constant). The meter is the model's choice
# for the ensemble (format version 2 writes the ensemble before the conductor).
DEFAULT_INSTRUMENTS = ("choir-aahs", "choir-aahs", "voice-oohs", "voice-oohs")
DEFAULT_DYNAMICS = ("55-70", "70-85", "85-100", "70-85")

MODES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10, 11)}
_MODE_WORDS = {"": "major", "maj": "major", "major": "major", "m": "minor", "min": "minor", "minor": "minor"}
_KEY = re.compile(r"^\s*([A-Ga-g])([#b]?)\s*([A-Za-z]*)\s*$")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_FORM = re.compile(r"^[A-Za-z]+$")


def parse_key(name: str) -> tuple[int, str]:
    """``"D minor"`` -> ``(2, "minor")``: tonic pitch class and mode; ValueError with the accepted forms."""
    match = _KEY.match(name)
    word = match.group(3) if match else "?"
    mode = "major" if word == "M" else _MODE_WORDS.get(word.lower())
    if mode is None:
        raise ValueError(f"key {name!r}: write a tonic A-G (with # or b) and major or minor, e.g. 'D minor', 'Bb'")
    letter, accidental = match.group(1).upper(), match.group(2)
    return (LETTERS[letter] + ACCIDENTALS[accidental]) % 12, mode


def key_pitch_classes(name: str) -> np.ndarray:
    """The 12 booleans of the key's pitch classes (C = 0)."""
    tonic, mode = parse_key(name)
    out = np.zeros(12, dtype=bool)
    out[[(tonic + step) % 12 for step in MODES[mode]]] = True
    return out


def parse_dynamics(ranges: Sequence[str], tok: HIDTokenizer) -> list[tuple[int, int]]:
    """``["40-70"]`` -> ``[(40, 70)]``; ValueError for a malformed range or one holding no velocity step."""
    if not ranges:
        raise ValueError("dynamics: give at least one velocity range, e.g. 40-70")
    out = []
    for text in ranges:
        match = _RANGE.match(text)
        low, high = (int(g) for g in match.groups()) if match else (0, 0)
        if not match or not 1 <= low <= high <= 127:
            raise ValueError(f"dynamics {text!r}: write a velocity range LO-HI within 1-127, e.g. 40-70")
        if not ((tok.velocity_values >= low) & (tok.velocity_values <= high)).any():
            steps = ", ".join(map(str, tok.velocity_values[:4]))
            raise ValueError(f"dynamics {text!r}: no velocity step inside (the steps are {steps}, ...)")
        out.append((low, high))
    return out


def per_bar(ranges: Sequence[tuple[int, int]], bars: int) -> list[tuple[int, int]]:
    """The ranges spread evenly over ``bars`` bars, in order."""
    return [ranges[b * len(ranges) // bars] for b in range(bars)]


def shape_dynamics(tok: HIDTokenizer, tokens: np.ndarray, ranges: Sequence[tuple[int, int] | None]) -> np.ndarray:
    """Move the velocities of every bar that has a range into it (a bar without one, or past the list, keeps
    its own): all by one offset, which puts the median of the shaped bars' velocities in the middle of each
    range, then clipped to the range and rounded to the nearest velocity step inside it. Only ``Vel`` tokens
    change, and louder stays at least as loud."""
    tokens = np.asarray(tokens)
    lay = layout(tokens, tok.kinds)
    bar_range = np.array([r if r is not None else (-1, -1) for r in ranges] + [(-1, -1)], dtype=np.int64)
    low, high = bar_range[np.clip(lay.bar, -1, len(ranges))].T
    shaped = (lay.kind == TokenKind.VEL) & (low >= 0)
    if not shaped.any():
        return tokens.copy()
    velocity = tok.velocity_values[tokens[shaped].astype(np.int64) - tok.vel0]
    low, high = low[shaped], high[shaped]
    target = np.clip(velocity - np.median(velocity) + (low + high) / 2, low, high)
    steps = tok.velocity_values
    distance = np.abs(steps[None, :] - target[:, None]).astype(float)
    distance[(steps[None, :] < low[:, None]) | (steps[None, :] > high[:, None])] = np.inf
    out = tokens.copy()
    out[shaped] = tok.vel0 + distance.argmin(axis=1)
    return out


class Steer(Protocol):
    """A control applied while sampling: for the next token of ``track`` (its number; 0 is the conductor) in
    ``bar`` (from 0), the latest onset ``onset`` of that bar (-1 before any), given the tokens ``written`` so
    far, a log-probability bias over the vocabulary and a mask of the tokens still allowed (each None where it
    has nothing to say). The sampler ignores a mask that would leave nothing the grammar allows."""

    def __call__(
        self, bar: int, track: int, onset: int, written: Sequence[int] = ()
    ) -> tuple[np.ndarray | None, np.ndarray | None]: ...


# General MIDI programs that play a bass line: the basses, cello, contrabass, trombone, tuba, bassoon.
BASS_PROGRAMS = frozenset([*range(32, 40), 42, 43, 57, 58, 70])


def bass_track(instruments: Sequence[int]) -> int | None:
    """The number (from 1; the conductor is 0) of the track that carries the bass among ``instruments``
    (``Track`` tokens): the last bass instrument, else the last pitched track; None with fewer than two
    pitched tracks (a single line is a melody, not a bass)."""
    pitched = [n for n, token in enumerate(instruments, start=1) if token != TRACK_DRUMS]
    if len(pitched) < 2:
        return None
    basses = [n for n in pitched if instruments[n - 1] - TRACK_PROGRAM0 in BASS_PROGRAMS]
    return (basses or pitched)[-1]


class ChordBinding:
    """How a forced chord per bar steers the notes written under it.

    ``bias`` adds ``strength`` to the log-probability of every pitch whose pitch class is a tone of the bar's
    chord (pitched tracks only); ``downbeat`` allows only the chord's root among the pitches of the bass
    track's notes at position 0. ``chords`` holds, per bar, an index into ``tok.chords`` or None (free).
    ``instruments`` None: the model chooses them, and they are read from the ensemble once it is written.
    """

    def __init__(
        self, tok: HIDTokenizer, chords: Sequence[int | None], instruments: Sequence[int] | None, strength: float
    ) -> None:
        self.chords = list(chords)
        self._anything = np.ones(tok.vocab_size, dtype=bool)
        self.instruments: list[int] | None = None
        self.bass: int | None = None
        if instruments is not None:
            self._know(instruments)
        pitch_class = np.arange(128) % 12
        self._bias, self._roots = {}, {}
        is_pitch = np.zeros(tok.vocab_size, dtype=bool)
        is_pitch[tok.pitch0 : tok.pitch0 + 128] = True
        for index in {c for c in self.chords if c is not None}:
            root, quality = tok.chords[index]
            tones = np.isin(pitch_class, [(root + k) % 12 for k in CHORD_QUALITIES[quality]])
            bias = np.zeros(tok.vocab_size, dtype=np.float32)
            bias[tok.pitch0 : tok.pitch0 + 128] = strength * tones
            self._bias[index] = bias
            roots = ~is_pitch
            roots[tok.pitch0 : tok.pitch0 + 128] = pitch_class == root
            self._roots[index] = roots

    def _know(self, instruments: Sequence[int]) -> None:
        self.instruments = list(instruments)
        self.bass = bass_track(self.instruments)

    def __call__(
        self, bar: int, track: int, onset: int, written: Sequence[int] = ()
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``Steer``: the chord-tone bias, and at the downbeat the bass's root."""
        if self.instruments is None:
            conductor = np.flatnonzero(np.asarray(written) == TRACK_CONDUCTOR)
            if len(conductor):  # the ensemble stands between BOS and the conductor
                self._know([int(t) for t in written[1 : conductor[0]]])
        return self.bias(bar, track), self.downbeat(bar, track) if onset == 0 else None

    def _chord(self, bar: int, track_number: int) -> int | None:
        if track_number < 1 or not 0 <= bar < len(self.chords) or self.instruments is None:
            return None
        if track_number <= len(self.instruments) and self.instruments[track_number - 1] == TRACK_DRUMS:
            return None
        return self.chords[bar]

    def bias(self, bar: int, track_number: int) -> np.ndarray | None:
        """The log-probability bias over the vocabulary for a note of ``track_number`` in ``bar`` (from 0), or
        None where no chord binds (the conductor, drums, free bars)."""
        chord = self._chord(bar, track_number)
        return None if chord is None else self._bias[chord]

    def downbeat(self, bar: int, track_number: int) -> np.ndarray:
        """What the tokens at the downbeat of ``bar`` may be: the root among pitches in the bass track, any
        token elsewhere."""
        chord = self._chord(bar, track_number)
        if chord is None or track_number != self.bass:
            return self._anything
        return self._roots[chord]


def current_track(tok: HIDTokenizer, written: np.ndarray) -> int:
    """The index in ``written`` of the ``Track`` token of the track being written."""
    return int(np.flatnonzero(tok.kinds[written] == TokenKind.TRACK)[-1])


def track_bars(tokens: np.ndarray) -> list[np.ndarray]:
    """A track's bars so far from its tokens after its ``Track`` token: each the tokens after its ``Bar``."""
    return [bar[1:] for bar in np.split(tokens, np.flatnonzero(tokens == BAR))[1:]]


# Added to the log-probability of the next token of an earlier bar that the bar being written has copied so far
# (``Restatement``): e^2, 7x. With the shipped model its single lines then repeat their bars about as often as
# the held-out tunes do (1.0 still too rarely; docs/results.md, "Restatement: bars the model begins as copies").
RESTATEMENT_BIAS = 2.0
VOICE_PROGRAMS = (52, 53, 54)  # General MIDI: choir aahs, voice oohs, synth voice
# The lowest and highest note that each voice of the reference corpus's four-part chorales sings (soprano, alto,
# tenor, bass; the 351 training chorales): a choir's voices keep to their parts' ranges (``choir_ranges``).
CHOIR_RANGES = ((57, 81), (53, 74), (48, 69), (36, 64))
VOICE_LEADING = {"auto": None, "on": True, "off": False}  # the control's settings -> GenerationRequest's


def choir_ranges(voices: int) -> list[tuple[int, int]]:
    """The lowest and highest pitch of each voice of a choir of ``voices``, listed high to low: SATB's four parts;
    with another count the first sings soprano or alto, the last tenor or bass, and those between alto or tenor
    (one voice: any part)."""
    soprano, alto, tenor, bass = CHOIR_RANGES
    if voices == 4:
        return list(CHOIR_RANGES)
    if voices == 1:
        return [(bass[0], soprano[1])]
    return [(alto[0], soprano[1]), *[(tenor[0], alto[1])] * (voices - 2), (bass[0], tenor[1])]


def sung(instruments: Sequence[int]) -> bool:
    """Whether every track of ``instruments`` (Track token ids) is a voice: a choir, the default of voice-leading."""
    voices = {TRACK_PROGRAM0 + program for program in VOICE_PROGRAMS}
    return bool(instruments) and all(token in voices for token in instruments)


class VoiceLeading:
    """``Steer`` for part-writing: the pitches of a track's notes may neither cross the voices written before it
    nor move with one of them in parallel fifths or octaves.

    Voices are pitched tracks, each its line (highest note at each onset, ``features.line``). The track being
    written sits, by the mean pitch of its notes so far, between two earlier voices; at each onset its pitch
    stays between what they sound (from its second note on). ``ordered`` (a choir, listed high to low as SATB
    is) places it by the ensemble's order instead: below the voice listed before it and, in a fill pass, above
    the one listed after it, from its first note, and inside its part's range (``choir_ranges``; the first
    voice too). A pitch is also refused when, against an earlier voice that moves at this onset, it would keep
    the fifth or octave (modulo octaves) that the two held at the piece's previous onset, moving the same way:
    the two faults ``features.parallels_and_crossings`` counts.

    ``rewrites``: the instrument track (from 0) whose bars a fill pass rewrites (``meloformer.fill``). It is
    then no earlier voice: its bars outside the region are the written track's own notes.
    """

    def __init__(self, tok: HIDTokenizer, rewrites: int | None = None, ordered: bool = False) -> None:
        self.tok = tok
        self.rewrites = rewrites
        self.ordered = ordered
        self.pitch = np.arange(128)
        self._parsed_tracks = -1
        self._voices: list[np.ndarray] = []
        self._listed: list[int] = []  # each voice's instrument track (from 0)
        self._ensemble = 0  # the piece's instruments: the Track tokens between BOS and the conductor
        self._kept = np.zeros((0, len(COL)), dtype=np.int64)  # the rewritten track's notes outside the region
        self._bar_starts = np.zeros(0, dtype=np.int64)

    def __call__(
        self, bar: int, track: int, onset: int, written: Sequence[int] = ()
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        written = np.asarray(written, dtype=np.int64)
        if track < (1 if self.ordered else 2) or onset < 0 or not len(written):
            return None, None
        start = current_track(self.tok, written)
        if written[start] == TRACK_DRUMS:
            return None, None
        self._read_earlier_tracks(written[:start], track)
        own = np.concatenate([self._kept, self._own_notes(track_bars(written[start + 1 :]))])
        if (not self.ordered and (not self._voices or len(own) == 0)) or bar >= len(self._bar_starts):
            return None, None
        time = int(self._bar_starts[bar] + onset)
        voice = line(own) if len(own) else None  # None: an ordered voice's first note
        if self.ordered:
            between = self._between_listed(time, track - 1 if self.rewrites is None else self.rewrites)
        else:
            between = self._between_neighbours(voice, time)
        no_parallels = np.ones(128, dtype=bool) if voice is None else self._no_parallels(voice, time)
        # Earlier voices that cross each other leave no pitch between them: then only the parallels count.
        allowed = between & no_parallels if (between & no_parallels).any() else no_parallels
        mask = np.ones(self.tok.vocab_size, dtype=bool)
        mask[self.tok.pitch0 : self.tok.pitch0 + 128] = allowed
        return None, mask

    def _read_earlier_tracks(self, tokens: np.ndarray, track: int) -> None:
        """The lines of the complete pitched tracks before track ``track`` (parsed once per track)."""
        if track == self._parsed_tracks:
            return
        piece = self.tok.parse(tokens, partial=True)
        notes = self.tok.note_table(piece)
        pitched = [n for n, (token, _) in enumerate(piece.tracks) if token != TRACK_DRUMS and n != self.rewrites]
        by_track = [notes[notes[:, COL["track"]] == n] for n in pitched]
        if self.rewrites is not None:
            self._kept = notes[notes[:, COL["track"]] == self.rewrites]
        self._voices = [line(own) for own in by_track if len(own)]
        self._listed = [n for n, own in zip(pitched, by_track) if len(own)]
        self._ensemble = int(np.flatnonzero(tokens == TRACK_CONDUCTOR)[0]) - 1
        self._bar_starts, self._parsed_tracks = piece.bar_starts(self.tok), track

    def _own_notes(self, bars: list[np.ndarray]) -> np.ndarray:
        """Note-table rows (bar, onset, pitch and duration filled) of the current track's notes so far."""
        rows = [
            (b, int(self._bar_starts[b]) + pos, pitch, int(self.tok.duration_values[dur]))
            for b, bar in enumerate(bars[: len(self._bar_starts)])
            for pos, pitch, dur, _ in self.tok.bar_notes(bar)
        ]
        out = np.zeros((len(rows), len(COL)), dtype=np.int64)
        if rows:
            out[:, [COL["bar"], COL["onset"], COL["pitch"], COL["duration"]]] = rows
        return out

    def _between_neighbours(self, own: np.ndarray, time: int) -> np.ndarray:
        """Pitches at or below the nearest earlier voice above this track's mean pitch, at or above the one below."""
        mean = own[:, 1].mean()
        above = [v for v in self._voices if v[:, 1].mean() > mean]
        below = [v for v in self._voices if v[:, 1].mean() <= mean]
        upper = min(above, key=lambda v: v[:, 1].mean()) if above else None
        lower = max(below, key=lambda v: v[:, 1].mean()) if below else None
        return self._between(upper, lower, time, np.ones(128, dtype=bool))

    def _between_listed(self, time: int, listed_as: int) -> np.ndarray:
        """Pitches at or below the voice listed before this track (instrument ``listed_as``, from 0), at or
        above the one listed after it, and inside its part's range in the piece's ensemble."""
        listed = list(zip(self._listed, self._voices))
        above = [v for n, v in listed if self.rewrites is None or n < self.rewrites]
        below = [v for n, v in listed if self.rewrites is not None and n > self.rewrites]
        upper, lower = (above[-1] if above else None), (below[0] if below else None)
        low, high = choir_ranges(self._ensemble)[min(listed_as, self._ensemble - 1)]
        return self._between(upper, lower, time, (self.pitch >= low) & (self.pitch <= high))

    def _between(
        self, upper: np.ndarray | None, lower: np.ndarray | None, time: int, allowed: np.ndarray
    ) -> np.ndarray:
        """``allowed`` kept at or below what voice ``upper`` sounds at ``time`` and at or above what ``lower``
        sounds (no limit from a voice that is None or silent there)."""
        if upper is not None:
            pitch = sounding(upper, np.array([time]))[0]
            allowed &= (pitch < 0) | (self.pitch <= pitch)
        if lower is not None:
            pitch = sounding(lower, np.array([time]))[0]
            allowed &= (pitch < 0) | (self.pitch >= pitch)
        return allowed

    def _no_parallels(self, own: np.ndarray, time: int) -> np.ndarray:
        """Pitches that keep no fifth or octave with an earlier voice moving the same way from the previous onset."""
        return ~parallel_moves(own, self._voices, np.array([time]))[0]


def parse_form(form: str, bars: int) -> list[int | None]:
    """``"AABA"`` over 16 bars -> per bar, the earlier bar it restates (None: new material): 4-bar phrases,
    the second and fourth restating the first. ValueError unless the letters divide the bars evenly."""
    if not _FORM.match(form):
        raise ValueError(f"form {form!r}: write one letter per phrase, e.g. AABA")
    if bars % len(form):
        raise ValueError(f"form {form!r}: {bars} bars do not divide into {len(form)} equal phrases")
    length, first = bars // len(form), {}
    source: list[int | None] = []
    for phrase, letter in enumerate(form.upper()):
        start = first.setdefault(letter, phrase)
        source += [None if start == phrase else start * length + k for k in range(length)]
    return source


class FormRepeat:
    """``Steer`` for a form: in a bar that restates an earlier one (``parse_form``), each track's tokens are
    drawn towards that track's earlier bar. At each onset the earlier bar's tokens at the same onset (pitches,
    durations, velocities; conductor events) and its next onset (or the bar's end) get ``strength``."""

    def __init__(self, tok: HIDTokenizer, source: Sequence[int | None], strength: float) -> None:
        self.tok, self.source, self.strength = tok, list(source), strength

    def __call__(
        self, bar: int, track: int, onset: int, written: Sequence[int] = ()
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not 0 <= bar < len(self.source) or self.source[bar] is None:
            return None, None
        written = np.asarray(written, dtype=np.int64)
        bars = track_bars(written[current_track(self.tok, written) + 1 :])
        if self.source[bar] >= len(bars):
            return None, None
        earlier = bars[self.source[bar]]
        is_pos = self.tok.kinds[earlier] == TokenKind.POS
        onsets = np.where(is_pos, earlier - self.tok.pos0, -1)
        group = np.maximum.accumulate(np.where(is_pos, np.arange(len(earlier)), -1))  # each token's Pos
        at = np.where(group >= 0, onsets[np.maximum(group, 0)], -1)
        wanted = earlier[(at == onset) & ~is_pos].tolist()
        later = earlier[is_pos & (onsets > onset)]
        wanted.append(int(later[0]) if len(later) else BAR)
        bias = np.zeros(self.tok.vocab_size, dtype=np.float32)
        bias[wanted] = self.strength
        return bias, None


class Restatement:
    """``Steer`` that lets a bar the model has begun as a copy of an earlier bar of its track end as one.

    Once the bar being written holds a note and is, token for token, the start of an earlier bar of the same
    track, the next token of the nearest such bar (or its end) gets ``strength``. Under forced chords
    (``chords``, per bar, None where free) only a bar with the same chord is restated. The model
    decides what to restate; without the pull, a 2.5M-parameter model drifts off a repeat halfway and repeats
    whole bars half as often as the tunes it learned from (docs/results.md).
    """

    def __init__(self, tok: HIDTokenizer, strength: float, chords: Sequence[int | None] = ()) -> None:
        self.tok, self.strength, self.chords = tok, strength, list(chords)

    def __call__(
        self, bar: int, track: int, onset: int, written: Sequence[int] = ()
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        if onset < 0:
            return None, None
        written = np.asarray(written, dtype=np.int64)
        *earlier_bars, current = track_bars(written[current_track(self.tok, written) + 1 :]) or [written[:0]]
        if not (self.tok.kinds[current] == TokenKind.PITCH).any():
            return None, None
        for j in reversed(range(len(earlier_bars))):
            earlier = earlier_bars[j]
            if self._chord(j) != self._chord(bar):
                continue
            if len(earlier) >= len(current) and np.array_equal(earlier[: len(current)], current):
                bias = np.zeros(self.tok.vocab_size, dtype=np.float32)
                bias[int(earlier[len(current)]) if len(earlier) > len(current) else BAR] = self.strength
                return bias, None
        return None, None

    def _chord(self, bar: int) -> int | None:
        return self.chords[bar] if bar < len(self.chords) else None
