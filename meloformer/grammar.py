"""A grammar over HID token kinds: which tokens may come next, so every sample decodes to valid MIDI.

``HIDGrammar.allowed()`` returns a boolean mask over the vocabulary for the next token; ``advance(token)``
moves the state on. Inside a bar it follows ``hid.BarSyntax``, the rules that ``HIDTokenizer.parse``
checks. The piece opens with its ensemble (the Track token of every instrument track, before the conductor),
and the tracks then follow it one by one. Around the bars it asks for what the encoder writes and parse does
not check: positions inside the bar's length, rising pitches at one onset, an ensemble in the canonical
priority order (drums, bass, chords/pads, melodic lines) unless ``free_track_order``, every track as many
bars as the conductor, at most ``max_tracks`` tracks (15 pitched), and at least one note. On top come the
controls of generation: a fill pass (``meloformer.fill``: one track's ``Track`` token again after the last
track, and bars up to the region's last), a fixed number of bars, a fixed time signature and tempo (or
``keep_meter``: the conductor's first bar sets the meter of the piece), a fixed list of instrument tracks (the
ensemble), a chord per bar (the conductor must write it), and per bar the pitch classes of a key (pitched
notes and free chords stay in it). Dynamics are not a grammar rule: they shape the written piece
(``steering.shape_dynamics``).

numpy only: the sampler in ``meloformer.sampler`` applies the mask to the model's logits.
"""

from __future__ import annotations

import numpy as np

from meloformer.hid import (
    BAR,
    BOS,
    CHORD_QUALITIES,
    EOS,
    MAX_PITCHED_TRACKS,
    TRACK_CONDUCTOR,
    TRACK_DRUMS,
    TRACK_PROGRAM0,
    BarSyntax,
    HIDError,
    HIDTokenizer,
    TokenKind,
    track_priority,
)


def track_order_key(track_token: int) -> tuple[int, int]:
    if track_token == TRACK_DRUMS:
        return (0, 0)
    program = track_token - TRACK_PROGRAM0
    return (track_priority(program, False), program)


def _pitch_mask(tok: HIDTokenizer, pitch_classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the 128 pitches in ``pitch_classes``, the chords of ``tok.chords`` whose tones all are)."""
    chords = [all(pitch_classes[(root + k) % 12] for k in CHORD_QUALITIES[q]) for root, q in tok.chords]
    return pitch_classes[np.arange(128) % 12], np.array(chords)


class HIDGrammar:
    """Incremental grammar state for one sequence being generated."""

    def __init__(
        self,
        tok: HIDTokenizer,
        n_bars: int | None = None,
        time_signature: tuple[int, int] | None = None,
        tempo_bin: int | None = None,
        instruments: list[int] | None = None,
        free_track_order: bool = False,
        chords: list[int | None] | None = None,
        keep_meter: bool = False,
        pitch_classes: list[np.ndarray | None] | None = None,
        fill: tuple[int, int] | None = None,
    ) -> None:
        if time_signature is not None and tuple(time_signature) not in tok.time_signatures:
            raise HIDError(f"unsupported time signature {time_signature[0]}/{time_signature[1]}")
        if n_bars is not None and not 1 <= n_bars <= tok.max_bars:
            raise HIDError(f"bars must be in 1..{tok.max_bars}, got {n_bars}")
        self.tok = tok
        self.n_bars = n_bars
        self.time_signature = tuple(time_signature) if time_signature else None
        self.tempo_bin = tempo_bin
        self.instruments = list(instruments) if instruments is not None else None
        self.free_track_order = free_track_order
        self.chords = list(chords) if chords is not None else []  # per bar: index into tok.chords, None = free
        self.keep_meter = keep_meter
        self.fill = fill  # (Track token, bars) of a fill pass after the last track; None: EOS there
        # per bar, None = free: the allowed Pitch tokens of pitched tracks and free Chord tokens
        self._pitches = [None if pcs is None else _pitch_mask(tok, pcs) for pcs in pitch_classes or ()]
        kinds = tok.kinds
        self._of_kind = {k: kinds == k for k in TokenKind}
        self._pos = np.arange(tok.bar_positions)
        self._track_tokens = np.flatnonzero(kinds == TokenKind.TRACK)
        # state
        self.started = False
        self.done = False
        self.ensemble: list[int] = []  # the Track tokens written before the conductor
        self.track_number = -1  # -1 = the ensemble, 0 = conductor
        self.track_token = 0
        self.tracks: list[int] = []
        self.bars_done = 0
        self.bar_lengths: list[int] = []
        self.bar: BarSyntax | None = None  # None between a Track token and its first Bar
        self.last_pitch = -1  # the latest pitch at the current onset
        self.notes = 0

    @classmethod
    def from_tokens(cls, tok: HIDTokenizer, tokens, **controls) -> HIDGrammar:
        grammar = cls(tok, **controls)
        for t in np.asarray(tokens).tolist():
            grammar.advance(int(t))
        return grammar

    # ------------------------------------------------------------------ helpers
    @property
    def in_conductor(self) -> bool:
        return self.track_number == 0

    def _bar_length(self) -> int:
        return self.bar_lengths[self.bars_done - 1]

    def _may_close_bar(self) -> bool:
        """May the current bar end here? Not if it is the last chance to write the piece's first note."""
        if self.in_conductor or self.notes > 0:
            return True
        last_bar = self.bars_done == self.track_bars()
        return not (last_bar and self._is_last_pass())

    def _is_last_pass(self) -> bool:
        """Is this the last track written: the fill pass, or else the ensemble's last track?"""
        return self.in_fill if self.fill is not None else self.track_number == len(self.instruments)

    @property
    def in_fill(self) -> bool:
        """Is the fill pass being written?"""
        return self.fill is not None and self.instruments is not None and self.track_number > len(self.instruments)

    def track_bars(self) -> int | None:
        """Bars of the track being written: the piece's, or the fill pass's."""
        return self.fill[1] if self.in_fill else self.n_bars

    def _end_of_bar(self, mask: np.ndarray) -> None:
        """Allow what may follow a complete bar: another Bar, the next Track, or EOS."""
        if not self._may_close_bar():
            return
        if self.n_bars is None:  # only in the conductor: it decides how many bars every track gets
            if self.bars_done < self.tok.max_bars:
                mask[BAR] = True
            self._next_track(mask)
        elif self.bars_done < self.track_bars():
            mask[BAR] = True
        else:
            self._next_track(mask)

    def _next_track(self, mask: np.ndarray) -> None:
        """The ensemble's next track, the fill pass after the last one, or EOS."""
        if self.track_number < len(self.instruments):
            mask[self.instruments[self.track_number]] = True
        elif self.fill is not None and not self.in_fill:
            mask[self.fill[0]] = True
        elif self.notes > 0:
            mask[EOS] = True

    def _ensemble_rules(self, mask: np.ndarray) -> None:
        """The ensemble: the given instruments one by one, or any tracks within the limits, in canonical order."""
        written = len(self.ensemble)
        if self.instruments is not None:
            mask[self.instruments[written] if written < len(self.instruments) else TRACK_CONDUCTOR] = True
            return
        mask[TRACK_CONDUCTOR] = written > 0
        if written >= self.tok.max_tracks:
            return
        pitched = sum(1 for t in self.ensemble if t != TRACK_DRUMS)
        for t in self._track_tokens:
            if t == TRACK_CONDUCTOR or (t != TRACK_DRUMS and pitched >= MAX_PITCHED_TRACKS):
                continue
            if self.free_track_order or not written or track_order_key(t) >= track_order_key(self.ensemble[-1]):
                mask[t] = True

    def _of_bar(self, per_bar: list) -> np.ndarray | None:
        return per_bar[self.bars_done - 1] if self.bars_done <= len(per_bar) else None

    # ------------------------------------------------------------------ the rules
    def allowed(self) -> np.ndarray:
        mask = np.zeros(self.tok.vocab_size, dtype=bool)
        if self.done:
            return mask
        if not self.started:
            mask[BOS] = True
        elif self.track_number < 0:
            self._ensemble_rules(mask)
        elif self.bar is None:
            mask[BAR] = True
        else:
            self._bar_rules(mask)
        return mask

    def _bar_rules(self, mask: np.ndarray) -> None:
        """The bar syntax's next kinds, narrowed to the canonical form and the controls."""
        tok, bar = self.tok, self.bar
        kinds = bar.next_kinds()
        chord = self.chords[self.bars_done - 1] if self.bars_done <= len(self.chords) else None
        if TokenKind.CHORD not in kinds:
            chord = None
        elif chord is not None:  # the bar's given chord comes next (a time signature may still precede it)
            kinds = tuple(k for k in kinds if k == TokenKind.TIMESIG)
            mask[tok.chord0 + chord] = True
        pitches = self._of_bar(self._pitches)
        for kind in kinds:
            if kind == TokenKind.TIMESIG and self.time_signature is not None:
                if self.bars_done == 1:  # a fixed time signature is written once, in bar 0
                    mask[tok.timesig0 + tok.time_signatures.index(self.time_signature)] = True
            elif kind == TokenKind.TIMESIG and self.keep_meter and self.bars_done > 1:
                continue  # the first bar's meter holds
            elif kind == TokenKind.CHORD and pitches is not None:
                mask[tok.chord0 : tok.chord0 + len(tok.chords)] = pitches[1]
            elif kind == TokenKind.TEMPO and self.tempo_bin is not None:
                mask[tok.tempo0 + self.tempo_bin] = True
            elif kind == TokenKind.POS:
                span = bar.positions(self._bar_length())
                ok = (self._pos >= span.start) & (self._pos < span.stop)
                if self.in_conductor and self.tempo_bin is not None:
                    ok &= (self._pos == 0) & (self.bars_done == 1)  # a fixed tempo is set once, at Pos_0
                mask[tok.pos0 + self._pos[ok]] = True
            elif kind == TokenKind.PITCH:
                mask[tok.pitch0 + self.last_pitch + 1 : tok.pitch0 + 128] = True
                if pitches is not None and self.track_token != TRACK_DRUMS:
                    mask[tok.pitch0 : tok.pitch0 + 128] &= pitches[0]
            else:
                mask |= self._of_kind[kind]
        if bar.may_end and chord is None:
            self._end_of_bar(mask)

    def advance(self, token: int) -> None:
        """Take ``token`` as the next one; raises HIDError if the grammar does not allow it."""
        if not self.allowed()[token]:
            raise HIDError(f"token {self.tok.vocab[token]} is not allowed here")
        tok, kind = self.tok, self.tok.kinds[token]
        if token == BOS:
            self.started = True
        elif token == EOS:
            self.done = True
        elif kind == TokenKind.TRACK and self.track_number < 0 and token != TRACK_CONDUCTOR:
            self.ensemble.append(token)
        elif kind == TokenKind.TRACK:
            if self.instruments is None:
                self.instruments = list(self.ensemble)
            if self.in_conductor and self.n_bars is None:
                self.n_bars = self.bars_done
            self.track_number += 1
            self.track_token = token
            self.tracks.append(token)
            self.bars_done = 0
            self.bar = None
        elif token == BAR:
            self.bars_done += 1
            self.bar = BarSyntax(tok, self.track_token, first_bar=self.bars_done == 1)
            self.last_pitch = -1
            if self.in_conductor:
                self.bar_lengths.append(self.bar_lengths[-1] if self.bar_lengths else 0)
        else:
            self.bar.advance(token)
            if kind == TokenKind.TIMESIG:
                self.bar_lengths[-1] = tok.bar_length(*tok.time_signatures[token - tok.timesig0])
            elif kind == TokenKind.POS:
                self.last_pitch = -1
            elif kind == TokenKind.PITCH:
                self.last_pitch = token - tok.pitch0
                self.notes += 1
