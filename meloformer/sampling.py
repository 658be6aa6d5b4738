"""Grammar-constrained sampling of whole pieces with the KV-cached decoder (docs/design.md section 8).

Each step masks the tokens that ``HIDGrammar`` forbids, then applies temperature, top-k and top-p, so every
sample decodes to a valid MIDI file with notes. Controls: number of bars, instruments, tempo, time
signature, and a prompt (continue it, or add a track over it). Bars taken from a prompt are copied token
for token; the model only runs once the first free choice comes, on everything before it at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from meloformer.generate import IncrementalDecoder
from meloformer.grammar import HIDGrammar
from meloformer.hid import BAR, HIDTokenizer, TokenKind
from meloformer.model import MeloFormer


@dataclass
class GenerationRequest:
    """What to generate. ``prompt`` is an encoded piece: continue it (``bars`` > its bars: every prompt
    bar is kept, later bars are generated for every prompt track) or, with ``add_track``, keep it whole and
    write one new track (appended last, so it sees every prompt track)."""

    bars: int | None = 8
    instruments: list[int] | None = None  # Track token ids, in order; None: the model chooses
    tempo: float | None = None
    time_signature: tuple[int, int] | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    prompt: np.ndarray | None = None
    add_track: int | None = None  # a Track token id
    max_tokens: int | None = None


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


class _Plan:
    """Which bars are copied from the prompt, and the grammar that constrains the rest."""

    def __init__(self, tok: HIDTokenizer, request: GenerationRequest) -> None:
        self.forced: dict[tuple[int, int], list[int]] = {}  # (track number, bar) -> tokens after Bar
        tempo_bin = None
        if request.tempo is not None:
            tempo_bin = int(np.abs(np.log(tok.tempo_values) - np.log(request.tempo)).argmin())
        instruments, bars = request.instruments, request.bars
        if request.prompt is not None:
            piece = tok.parse(request.prompt)
            tracks = [piece.conductor] + [bars_ for _, bars_ in piece.tracks]
            instruments = [token for token, _ in piece.tracks]
            if request.add_track is not None:
                instruments = instruments + [request.add_track]
                bars = piece.n_bars
            elif bars is None or bars <= piece.n_bars:
                raise ValueError(f"to continue a {piece.n_bars}-bar prompt, ask for more bars (got {bars})")
            for number, track_bars in enumerate(tracks):
                for b, bar in enumerate(track_bars):
                    self.forced[(number, b)] = bar.tolist()
        self.grammar = HIDGrammar(
            tok,
            n_bars=bars,
            time_signature=request.time_signature,
            tempo_bin=tempo_bin,
            instruments=instruments,
            free_track_order=request.add_track is not None,
        )
        self.total_bars = None if bars is None else bars * (1 + len(instruments or []))

    def forced_after_bar(self) -> list[int] | None:
        """The prompt's tokens for the bar the grammar just opened, or None if it is generated."""
        g = self.grammar
        bar = self.forced.get((g.track_number, g.bars_done - 1))
        return None if bar is None else list(bar)


def check_request(tok: HIDTokenizer, request: GenerationRequest) -> None:
    """Raise ValueError (HIDError) naming the control that cannot be generated, before any model runs."""
    _Plan(tok, request)


@torch.no_grad()
def generate(
    model: MeloFormer,
    tok: HIDTokenizer,
    request: GenerationRequest,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Sample one piece under the grammar with KV-cached decoding; returns its tokens (BOS ... EOS)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    plan = _Plan(tok, request)
    grammar = plan.grammar
    capacity = request.max_tokens or model.config.max_seq_len
    decoder = IncrementalDecoder(model, capacity=capacity)
    queue: list[int] | None = None  # the rest of a bar copied from the prompt
    ends_bar = np.isin(tok.kinds, (TokenKind.BAR, TokenKind.TRACK, TokenKind.EOS))
    out: list[int] = []
    logits = None
    bar_count = tqdm(total=plan.total_bars, unit="bar", desc="generate", disable=not progress)
    while not grammar.done:
        allowed = grammar.allowed()
        if queue is not None and not queue:  # a copied bar is complete: nothing may be added to it
            allowed &= ends_bar
            queue = None
        if queue:
            token = queue.pop(0)
        elif allowed.sum() == 1:
            token = int(allowed.argmax())
        else:
            if logits is None:  # the first free choice: run everything so far through the model at once
                logits = decoder.prefill(torch.tensor([out], device=device))[:, -1]
            scores = filter_logits(logits[0], allowed, request.temperature, request.top_k, request.top_p)
            token = int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator))
        grammar.advance(token)
        out.append(token)
        if token == BAR:
            queue = plan.forced_after_bar()
            bar_count.update(1)
        if logits is not None and not grammar.done:
            if len(out) >= capacity:
                raise ValueError(f"the piece outgrew {capacity} tokens; ask for fewer bars or raise max_tokens")
            logits = decoder.step(torch.tensor([token], device=device))
    bar_count.close()
    return np.array(out, dtype=np.uint16)
