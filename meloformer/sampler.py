"""Grammar-constrained sampling of whole pieces with the KV-cached decoder (docs/design.md section 8).

Each step masks the tokens that ``HIDGrammar`` forbids, then applies temperature, top-k and top-p, so every
sample decodes to a valid MIDI file with notes. Controls: number of bars, instruments, tempo, time
signature, a chord per bar, a key, dynamics (velocity ranges), and a prompt (continue it, add a track over
it, or regenerate some of its bars, which ``meloformer.infill`` builds on). Bars taken from a prompt are
copied token for token; the model only runs once the first free choice comes, on everything before it at once.
Regenerated bars are left empty in place and written in a fill pass after the last track (``meloformer.fill``),
so they hear the whole piece, the bars after them included; the result has them back in place.

Every piece fits the model's context: the sampler keeps a token budget (``_Budget``) that always holds back
what the rest of the piece needs at the least (a ``Bar`` token per bar still to come, the notes that a bar
being written must complete, the prompt bars still to copy, ``EOS``). Each (track, bar) segment may spend an
equal share of what is left beyond that when it opens; past its share, or when the reserve is reached, only
the tokens that close the bar remain allowed. A prompt too long to leave room for the new bars is cropped to
its last bars that fit (``fit_to_context``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from meloformer import fill
from meloformer.chords import progression
from meloformer.decoder import IncrementalDecoder
from meloformer.edits import crop_bars
from meloformer.grammar import HIDGrammar
from meloformer.hid import BAR, MAX_PITCHED_TRACKS, TRACK_CONDUCTOR, TRACK_DRUMS, HIDTokenizer, TokenKind
from meloformer.model import MeloFormer
from meloformer.steering import (
    RESTATEMENT_BIAS,
    ChordBinding,
    FormRepeat,
    Restatement,
    Steer,
    VoiceLeading,
    key_pitch_classes,
    parse_dynamics,
    parse_form,
    per_bar,
    shape_dynamics,
    sung,
)


@dataclass
class GenerationRequest:
    """What to generate. ``prompt`` is an encoded piece: continue it (``bars`` > its bars: every prompt
    bar is kept, later bars are generated for every prompt track) or, with ``add_track``, keep it whole and
    write one new track (appended last, so it sees every prompt track), or keep it all but the
    ``regenerate`` bars. ``chords`` (names such as ``Am``) fix the chord of each generated bar, repeated;
    ``key`` (``meloformer.steering``) bounds the pitches of the new bars and ``dynamics`` shapes their velocities
    once they are written (``steering.shape_dynamics``). Without
    a prompt, the first bar's meter holds for the whole piece unless ``meter_changes``."""

    bars: int | None = 8
    instruments: list[int] | None = None  # Track token ids, in order; None: the model chooses
    tempo: float | None = None
    time_signature: tuple[int, int] | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    prompt: np.ndarray | None = None
    add_track: int | None = None  # a Track token id
    chords: list[str] | None = None
    key: str | None = None  # e.g. "D minor": pitched notes and free chords of new bars stay in it
    dynamics: list[str] | None = None  # velocity ranges such as "40-70", spread over the new bars
    meter_changes: bool = False  # may the model change the time signature after the first bar?
    regenerate: list[tuple[int, int]] | None = None  # (instrument track, bar) of the prompt, both from 0; one track
    voice_leading: bool | None = None  # no crossing, no parallel fifths or octaves with earlier tracks
    # (steering); None: on for a choir (``steering.sung``: every track a voice), off otherwise
    form: str | None = None  # a letter per phrase, e.g. "AABA": repeated letters restate their phrase (steering)
    restatement: float = RESTATEMENT_BIAS  # a bar begun as a copy of an earlier bar of its track is drawn to end
    # as one (steering.Restatement): the bias on each next token of that bar; 0: off
    max_tokens: int | None = None  # token budget of the piece; None (and at most): the model's max_seq_len


def parse_time_signature(text: str) -> tuple[int, int]:
    """``"3/4"`` -> ``(3, 4)``; ValueError names the text otherwise."""
    try:
        numerator, denominator = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"time signature {text!r}: write it as N/D, e.g. 3/4") from None
    return numerator, denominator


def filter_logits(logits: Tensor, allowed: np.ndarray, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Mask what the grammar forbids, then temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float().masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, int(allowed.sum()))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def fold_bar_into_closing(logits: Tensor, allowed: np.ndarray, closing: np.ndarray) -> Tensor:
    """Log-probabilities in which, where the grammar forbids ``Bar`` but allows closing the track (``Track`` or
    ``EOS``), the probability of ``Bar`` goes to the closing tokens.

    Training rows are bar windows, so after any bar the model expects another; in a track's last bar that
    wish means "this bar is over", not "add notes" (which would pile up on the bar's last onsets).
    """
    logits = logits.float().log_softmax(-1)
    close = torch.from_numpy(allowed & closing).to(logits.device)
    if allowed[BAR] or not bool(close.any()):
        return logits
    total = torch.logsumexp(logits[close], 0)
    return logits.masked_scatter(close, logits[close] + torch.logaddexp(total, logits[BAR]) - total)


class _Plan:
    """Which bars are copied from the prompt, and the grammar that constrains the rest."""

    def __init__(self, tok: HIDTokenizer, request: GenerationRequest) -> None:
        self.forced: dict[tuple[int, int], list[int]] = {}  # (track number, bar) -> tokens after Bar
        self.last_written: tuple[int, int] | None = None  # the last (track number, bar) not copied; None: all
        self.has_notes = False  # the prompt's notes count as the piece's note
        self.fill: tuple[int, set[int]] | None = None  # regenerated (instrument track, bars), both from 0
        tempo_bin = None
        if request.tempo is not None:
            tempo_bin = int(np.abs(np.log(tok.tempo_values) - np.log(request.tempo)).argmin())
        instruments, bars = request.instruments, request.bars
        if instruments is not None and instruments.count(TRACK_DRUMS) > 1:
            raise ValueError("instruments: 'drums' twice; MIDI has one drum channel, so give drums once")
        if request.prompt is not None:
            piece = tok.parse(request.prompt)
            tracks = [piece.conductor] + [bars_ for _, bars_ in piece.tracks]
            instruments = [token for token, _ in piece.tracks]
            if request.add_track is not None:
                _check_room_for(request.add_track, instruments, tok)
                instruments = instruments + [request.add_track]
                bars = piece.n_bars
            elif request.regenerate:
                bars = piece.n_bars
            elif bars is None or bars <= piece.n_bars:
                raise ValueError(f"to continue a {piece.n_bars}-bar prompt, ask for more bars (got {bars})")
            self.has_notes = len(tok.note_table(piece)) > 0
            for number, track_bars in enumerate(tracks):
                for b, bar in enumerate(track_bars):
                    self.forced[(number, b)] = bar.tolist()
            for track, b in request.regenerate or ():
                if (track + 1, b) not in self.forced:
                    raise ValueError(f"bar {b} of track {track} (from 0) is not in the prompt")
                self.forced[(track + 1, b)] = []  # left empty in place: the fill pass writes it
            if request.regenerate:
                self.last_written = self._plan_fill(request.regenerate, len(instruments))
            else:
                tracks_bars = [(t, b) for t in range(1 + len(instruments)) for b in range(bars)]
                written = [segment for segment in tracks_bars if segment not in self.forced]
                self.last_written = max(written, default=(-1, -1))
        elif request.regenerate:
            raise ValueError("regenerating bars needs a prompt")
        chords = pitch_classes = None
        self.velocities: list[tuple[int, int] | None] | None = None  # per bar, shaped after sampling
        steered = [name for name in ("chords", "key", "dynamics") if getattr(request, name)]
        if steered:
            if request.prompt is not None and (request.add_track is not None or request.regenerate):
                name = steered[0]
                raise ValueError(
                    f"--{name} steers new bars only; adding a track or regenerating bars keeps the prompt's {name}"
                )
            if bars is None:
                raise ValueError(f"--{steered[0]} needs a number of bars")
            first = 0 if request.prompt is None else piece.n_bars  # a prompt's bars keep their own
            free = [None] * first
            if request.chords:
                if len(request.chords) > bars - first:
                    raise ValueError(
                        f"{len(request.chords)} chords for {bars - first} new bars: give at most one chord per "
                        "bar (or more bars)"
                    )
                chords = free + progression(tok, request.chords, bars - first)
            if request.key:
                pitch_classes = free + [key_pitch_classes(request.key)] * (bars - first)
            if request.dynamics:
                self.velocities = free + per_bar(parse_dynamics(request.dynamics, tok), bars - first)
        self.grammar = HIDGrammar(
            tok,
            n_bars=bars,
            time_signature=request.time_signature,
            tempo_bin=tempo_bin,
            instruments=instruments,
            chords=chords,
            keep_meter=request.prompt is None and not request.meter_changes,
            pitch_classes=pitch_classes,
            fill=None if self.fill is None else (instruments[self.fill[0]], max(self.fill[1]) + 1),
        )
        self.form = None
        if request.form:
            if request.prompt is not None:
                raise ValueError("--form plans a new piece; it cannot be used with --prompt")
            self.form = parse_form(request.form, bars)
        self.instruments = instruments
        self.total_bars = None if bars is None or instruments is None else bars * len(instruments)  # instruments'
        if self.fill is not None:
            self.total_bars += max(self.fill[1]) + 1

    def _plan_fill(self, regenerate: list[tuple[int, int]], n_tracks: int) -> tuple[int, int]:
        """Plan the fill pass of the ``regenerate`` bars (track number ``n_tracks + 1``): its other bars copied
        from the track from ``fill.FILL_CONTEXT_BARS`` before the first region bar on, empty before that;
        returns its last bar, the last one written."""
        tracks = sorted({track for track, _ in regenerate})
        if len(tracks) > 1:
            raise ValueError("regenerate bars of one track at a time (infill fills tracks one after another)")
        bars = {b for _, b in regenerate}
        self.fill = (tracks[0], bars)
        for b in range(max(bars) + 1):
            if b not in bars:
                copied = b >= min(bars) - fill.FILL_CONTEXT_BARS
                self.forced[(n_tracks + 1, b)] = self.forced[(tracks[0] + 1, b)] if copied else []
        return n_tracks + 1, max(bars)

    def model_needed(self) -> bool:
        """Is a bar still to be written? Once the last one is closed, the rest is copied without the model."""
        g = self.grammar
        return self.last_written is None or (g.track_number, g.bars_done - 1) <= self.last_written

    def opens_region_bar(self, onset: int) -> bool:
        """Is a regenerated bar open with nothing in it yet (``onset`` < 0)? It may not close so: the model
        cannot always tell where a region begins (an empty bar before it looks alike) and would often leave
        its first bar empty; the caller knows that the region has begun."""
        g = self.grammar
        return self.fill is not None and g.in_fill and onset < 0 and g.bars_done - 1 in self.fill[1]

    def forced_after_bar(self) -> list[int] | None:
        """The prompt's tokens for the bar the grammar just opened, or None if it is generated."""
        g = self.grammar
        bar = self.forced.get((g.track_number, g.bars_done - 1))
        return None if bar is None else list(bar)

    def forced_still_to_come(self) -> int:
        """Prompt tokens of the bars not yet opened (they are copied whatever the budget)."""
        g = self.grammar
        return sum(
            len(bar)
            for (track, b), bar in self.forced.items()
            if track > g.track_number or (track == g.track_number and b >= g.bars_done)
        )


def _check_room_for(track: int, tracks: list[int], tok: HIDTokenizer) -> None:
    """A track added to a prompt must fit the tokenizer's track limit and a MIDI channel of its own."""
    if len(tracks) + 1 > tok.max_tracks:
        raise ValueError(f"the prompt already has {len(tracks)} tracks: no room for another (max_tracks)")
    pitched = sum(t != TRACK_DRUMS for t in tracks)
    if track != TRACK_DRUMS and pitched >= MAX_PITCHED_TRACKS:
        raise ValueError(f"the prompt already has {pitched} pitched tracks, one per free MIDI channel: no room")
    if track == TRACK_DRUMS and TRACK_DRUMS in tracks:
        raise ValueError("the prompt already has a drum track (MIDI has one drum channel)")


# The most one content token can add to the least a piece still needs: a new onset in a bar without a
# duration or velocity yet brings Pos, Pitch, Dur and Vel.
OPEN_COST = 4


class _Budget:
    """Keeps a piece inside ``capacity`` tokens; see the module docstring."""

    def __init__(self, tok: HIDTokenizer, plan: _Plan, capacity: int) -> None:
        self.plan, self.capacity = plan, capacity
        kinds = tok.kinds
        self.ends_bar = np.isin(kinds, (TokenKind.BAR, TokenKind.TRACK, TokenKind.EOS))
        self.is_track = kinds == TokenKind.TRACK
        self.is_conductor = np.arange(len(kinds)) == TRACK_CONDUCTOR
        self.closes_track = np.isin(kinds, (TokenKind.TRACK, TokenKind.EOS))
        self.pos_or_chord = np.isin(kinds, (TokenKind.POS, TokenKind.CHORD))
        self.is_chord = kinds == TokenKind.CHORD
        self.segment_free = self.segment_share = 0

    def reserve(self, queue: list[int] | None) -> int:
        """The fewest tokens that can still finish the piece from the grammar's state (``EOS`` included)."""
        g = self.plan.grammar
        if not g.started or g.track_number < 0:
            return 2 + self._from_scratch()
        n_bars = g.n_bars if g.n_bars is not None else max(g.bars_done, 1)
        this_track = g.track_bars() or n_bars  # the fill pass's bars while it is written
        need = (this_track - g.bars_done) + self._close_bar() + 1 + self.plan.forced_still_to_come() + len(queue or [])
        if g.in_conductor and g.bars_done == 0 and (0, 0) not in self.plan.forced:
            need += 3  # the first bar's TimeSig, Pos and Tempo
        need += self._tracks_to_open() * (1 + n_bars) + self._fill_to_open()
        pitch_pending = g.bar is not None and g.bar.next_kinds() == (TokenKind.PITCH,)  # counted in _close_bar
        if g.notes == 0 and not pitch_pending and not self.plan.has_notes:
            need += OPEN_COST  # a piece needs a note
        return need

    def _from_scratch(self) -> int:
        """The least after BOS and the conductor's Track token: the rest of the ensemble, then the piece."""
        plan, g = self.plan, self.plan.grammar
        n_bars = g.n_bars or 1
        tracks = len(g.instruments) if g.instruments is not None else max(len(g.ensemble), 1)
        first_bar = 0 if (0, 0) in plan.forced else 3
        note = 0 if plan.has_notes else OPEN_COST
        ensemble_left = tracks - len(g.ensemble)
        bars = n_bars * (1 + tracks) + self._fill_to_open()
        return bars + first_bar + ensemble_left + tracks + note + 1 + plan.forced_still_to_come()

    def _tracks_to_open(self) -> int:
        g = self.plan.grammar
        return max(len(g.instruments or [None]) - max(len(g.tracks) - 1, 0), 0)

    def _fill_to_open(self) -> int:
        """The fill pass's Track and Bar tokens while it has not begun."""
        g = self.plan.grammar
        return 0 if g.fill is None or g.in_fill else 1 + g.fill[1]

    def _close_bar(self) -> int:
        """Tokens the current bar needs before it may end."""
        g = self.plan.grammar
        if g.bar is None or (g.track_number, g.bars_done - 1) in self.plan.forced:
            return 0  # a copied bar's tokens are counted as copies
        return g.bar.tokens_to_end()

    def opened_segment(self, used: int, queue: list[int] | None) -> None:
        """A Bar or Track token was just written: this segment may spend its share of the free tokens."""
        g = self.plan.grammar
        n_bars = g.n_bars if g.n_bars is not None else max(g.bars_done, 1)
        this_track = g.track_bars() or n_bars  # the fill pass's bars while it is written
        segments = (this_track - g.bars_done + 1) + self._tracks_to_open() * n_bars + max(self._fill_to_open() - 1, 0)
        self.segment_free = self.capacity - used - self.reserve(queue)
        self.segment_share = self.segment_free // max(segments, 1)

    def restrict(self, allowed: np.ndarray, used: int) -> np.ndarray:
        """``allowed`` less what the budget cannot pay for; never empty while the grammar allows something."""
        g = self.plan.grammar
        free = self.capacity - used - self.reserve(None)
        allowed = allowed.copy()
        if g.track_number < 0 and allowed[TRACK_CONDUCTOR] and free < self._new_track_cost() + 1:
            allowed &= ~self.is_track | self.is_conductor  # an extra instrument the piece cannot pay for
        if g.in_conductor and g.n_bars is None and free < 1 + self._tracks_to_open():
            allowed[BAR] = False  # another bar would cost a Bar in every track still to come
        ends, content = allowed & self.ends_bar, allowed & ~self.ends_bar
        first_note = g.notes == 0 and not g.in_conductor and not self.plan.has_notes
        if first_note:
            free += OPEN_COST  # the reserve held for the piece's first note is this note's to spend
        spent = self.segment_free - free
        if content.any() and free >= OPEN_COST and (spent + OPEN_COST // 2 <= self.segment_share or first_note):
            return allowed
        if ends.any():
            return ends
        for candidate in (content & ~self.pos_or_chord, content & ~self.is_chord):
            if candidate.any():
                return candidate
        return allowed

    def _new_track_cost(self) -> int:
        """An optional extra track is begun only with room for its bars and a note in each."""
        n_bars = self.plan.grammar.n_bars or 1
        return 1 + n_bars * (1 + OPEN_COST)


def check_request(tok: HIDTokenizer, request: GenerationRequest, capacity: int | None = None) -> None:
    """Raise ValueError (HIDError) naming the control that cannot be generated, before any model runs.

    With ``capacity`` (the model's context), also refuse a piece that cannot fit it even with empty bars.
    """
    if request.bars is not None and request.bars < 1:
        raise ValueError(f"bars must be at least 1, got {request.bars}")
    if request.temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or more, got {request.temperature}")
    if request.top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or more, got {request.top_k}")
    if not 0 < request.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {request.top_p}")
    if request.restatement < 0:
        raise ValueError(f"restatement must be 0 (off) or more, got {request.restatement:g}")
    if request.tempo is not None and not tok.tempo_min <= request.tempo <= tok.tempo_max:
        raise ValueError(f"tempo {request.tempo:g} is outside {tok.tempo_min:g}..{tok.tempo_max:g} quarter notes/min")
    plan = _Plan(tok, request)
    if capacity is not None:
        least = _Budget(tok, plan, capacity).reserve(None)
        if least > capacity:
            raise ValueError(
                f"{plan.grammar.n_bars} bars for {len(plan.instruments or [None])} track(s) need at least {least} "
                f"tokens; the model's context holds {capacity}: ask for fewer bars or instruments"
            )


def context_of(model: MeloFormer, request: GenerationRequest) -> int:
    """The token budget of a piece: ``request.max_tokens``, at most the model's ``max_seq_len``."""
    return min(request.max_tokens or model.config.max_seq_len, model.config.max_seq_len)


def fit_to_context(
    tok: HIDTokenizer, request: GenerationRequest, capacity: int
) -> tuple[GenerationRequest, str | None]:
    """Crop a prompt to its last bars that leave room for the new material; returns the request and a notice.

    Room means a ``Bar`` token and one note for every new (track, bar) segment. Continuing keeps the number
    of new bars; adding a track writes it over the bars kept.
    """
    if request.prompt is None:
        return request, None
    piece = tok.parse(request.prompt)
    n, tracks = piece.n_bars, len(piece.tracks)

    def room(kept: int) -> int:
        if request.add_track is not None:
            return 1 + kept * (1 + OPEN_COST)
        return (request.bars - n) * (1 + tracks) * (1 + OPEN_COST)

    if request.add_track is None and (request.bars is None or request.bars <= n):
        return request, None  # _Plan names the problem
    if len(request.prompt) + room(n) <= capacity:
        return request, None
    for first in range(1, n):
        cropped = crop_bars(tok, request.prompt, first, n)
        if len(cropped) + room(n - first) <= capacity:
            kept = n - first
            bars = request.bars if request.add_track is not None else request.bars - first
            notice = (
                f"the prompt's {n} bars leave too little of the model's {capacity}-token context for the new "
                f"material: using its last {kept} bars"
            )
            return dataclasses.replace(request, prompt=cropped, bars=bars), notice
    raise ValueError(f"not even the prompt's last bar leaves room in the model's {capacity}-token context")


# Added to the log-probability of each token of a restated bar's model, at its onset (``--form``): e^3, 20x.
# With the shipped model a restated bar then repeats its model in about a quarter to a third of the bars
# (docs/results.md: 2.0 was too weak for single lines, 4.0 repeats more than the chorales do).
FORM_BIAS = 3.0
# Added to the log-probability of a pitch whose pitch class is a tone of its bar's forced chord (``--chords``):
# e^1.0, about 2.7 times as likely relative to the other pitches (1.5 bound tighter but cost more voice-leading:
# docs/results.md).
CHORD_TONE_BIAS = 1.0


@torch.no_grad()
def generate(
    model: MeloFormer,
    tok: HIDTokenizer,
    request: GenerationRequest,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
    steer: Steer | None = None,
) -> np.ndarray:
    """Sample one piece under the grammar with KV-cached decoding; returns its tokens (BOS ... EOS), regenerated
    bars back in place from their fill pass.

    The piece never outgrows the model's context (see the module docstring); a prompt that would is cropped
    to its last bars (``fit_to_context``, which also returns the notice to show). In bars with a forced chord,
    chord tones get ``CHORD_TONE_BIAS`` and the bass track's notes at the downbeat take the chord's root
    (``steering.ChordBinding``); ``request.voice_leading`` (by default: for a choir) adds
    ``steering.VoiceLeading``, and ``request.restatement`` (outside a fill pass) ``steering.Restatement``.
    ``steer`` adds its own bias and pitch limits (``steering.Steer``; infilling's ``infill.RegionFit``).
    ``request.dynamics`` shapes the new bars' velocities at the end (``steering.shape_dynamics``): the model
    writes its notes with its own.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    capacity = context_of(model, request)
    request, _ = fit_to_context(tok, request, capacity)
    check_request(tok, request, capacity)
    plan = _Plan(tok, request)
    grammar = plan.grammar
    budget = _Budget(tok, plan, capacity)
    forced = any(chord is not None for chord in grammar.chords)
    steers = [ChordBinding(tok, grammar.chords, plan.instruments, CHORD_TONE_BIAS)] if forced else []
    rewrites = None if plan.fill is None else plan.fill[0]
    choir = sung(plan.instruments or ())
    voice_leading = choir if request.voice_leading is None else request.voice_leading
    steers += [VoiceLeading(tok, rewrites=rewrites, ordered=choir)] if voice_leading else []
    steers += [FormRepeat(tok, plan.form, FORM_BIAS)] if plan.form else []
    restate = request.restatement and plan.fill is None
    steers += [Restatement(tok, request.restatement, grammar.chords)] if restate else []
    steers += [steer] if steer is not None else []
    onset = -1  # the current bar's latest Pos
    decoder = IncrementalDecoder(model, capacity=capacity)
    queue: list[int] | None = None  # the rest of a bar copied from the prompt
    out: list[int] = []
    logits = None
    bar_count = tqdm(total=plan.total_bars, unit="bar", desc=desc, disable=not progress)
    while not grammar.done:
        allowed = grammar.allowed()
        if queue is not None and not queue:  # a copied bar is complete: nothing may be added to it
            allowed &= budget.ends_bar
            queue = None
        if queue:
            token = queue.pop(0)
        else:
            allowed = budget.restrict(allowed, len(out))
            if plan.opens_region_bar(onset) and (allowed & ~budget.ends_bar).any():
                allowed &= ~budget.ends_bar  # a regenerated bar is written (see _Plan.opens_region_bar)
            if allowed.sum() == 1:
                token = int(allowed.argmax())
            else:
                if logits is None:  # the first free choice: run everything so far through the model at once
                    logits = decoder.prefill(torch.tensor([out], device=device))[:, -1]
                folded = fold_bar_into_closing(logits[0], allowed, budget.closes_track)
                for steering in steers:
                    bias, only = steering(grammar.bars_done - 1, grammar.track_number, onset, out)
                    if bias is not None:
                        folded = folded + torch.from_numpy(bias).to(folded.device)
                    if only is not None and (allowed & only).any():
                        allowed = allowed & only
                scores = filter_logits(folded, allowed, request.temperature, request.top_k, request.top_p)
                token = int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator))
        grammar.advance(token)
        out.append(token)
        if tok.kinds[token] == TokenKind.POS:
            onset = token - tok.pos0
        if token == BAR:
            onset = -1
            queue = plan.forced_after_bar()
            bar_count.update(grammar.track_number > 0)  # instrument bars; the conductor's are not counted
        elif budget.is_track[token] and plan.total_bars is None and grammar.n_bars and grammar.track_number > 0:
            bar_count.total = grammar.n_bars * grammar.track_number  # the model opened one more track
            bar_count.refresh()
        if budget.is_track[token] or token == BAR:
            budget.opened_segment(len(out), queue)
        if logits is not None and not grammar.done and plan.model_needed():
            logits = decoder.step(torch.tensor([token], device=device))
    bar_count.close()
    if plan.fill is not None:
        return fill.merge(tok, np.array(out), *plan.fill)
    if plan.velocities is not None:
        return shape_dynamics(tok, np.array(out, dtype=np.uint16), plan.velocities)
    return np.array(out, dtype=np.uint16)
