"""KV-cached incremental decoding gives the logits of a full forward on the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import FLEX_LEN, batch, hid_pieces, tiny_model

from meloformer.decoder import IncrementalDecoder
from meloformer.hid import BAR, EOS, HIDTokenizer, TokenKind
from meloformer.layout import layout

TOK = HIDTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def decode(model, tokens: torch.Tensor, prompt: int, capacity: int | None = None) -> torch.Tensor:
    """Logits ``[B, n, vocab]``: a prefill of ``prompt`` tokens, then one step per remaining token."""
    decoder = IncrementalDecoder(model, capacity=capacity or tokens.shape[1], backend="sdpa")
    out = [decoder.prefill(tokens[:, :prompt])]
    out += [decoder.step(tokens[:, p])[:, None] for p in range(prompt, tokens.shape[1])]
    assert np.array_equal(decoder.tokens, tokens.numpy())
    return torch.cat(out, dim=1)


def full_forward(model, tokens: torch.Tensor, backend: str) -> torch.Tensor:
    """Full forward, padded to the session's compiled-flex shape (padding changes no logits)."""
    padded = batch(list(tokens.numpy()), FLEX_LEN)
    with torch.no_grad():
        return model(padded, ctx=model.prepare(padded, backend=backend))[:, : tokens.shape[1]]


def equal_length_rows(count: int, seed: int) -> torch.Tensor:
    """Two different pieces cut to one length, so their segments close at different steps."""
    pieces = hid_pieces(count, FLEX_LEN, seed)
    n = min(len(p) for p in pieces)
    return torch.as_tensor(np.stack([p[:n] for p in pieces]))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_incremental_decoding_equals_full_forward(backend: str):
    tokens = equal_length_rows(2, seed=11)
    kinds = layout(tokens.numpy(), TOK.kinds).kind
    closing = (kinds == TokenKind.BAR) | (kinds == TokenKind.TRACK) | (kinds == TokenKind.EOS)
    assert (closing[0] != closing[1]).any(), "rows should close segments at different steps"
    assert (kinds[:, 3:] == TokenKind.TRACK).any(), "decoding should cross a track boundary"
    model = tiny_model().eval()
    incremental = decode(model, tokens, prompt=3)
    assert torch.allclose(incremental, full_forward(model, tokens, backend), atol=1e-5)


@pytest.mark.parametrize("split", ["mid_segment", "at_bar", "at_track", "after_track"])
def test_prefill_at_any_point_then_decode(split: str):
    piece = torch.as_tensor(hid_pieces(1, FLEX_LEN, seed=12)[0])[None]
    kinds = layout(piece[0].numpy(), TOK.kinds).kind
    track_at = np.flatnonzero(kinds == TokenKind.TRACK)
    prompt = {
        "mid_segment": int(np.flatnonzero(kinds == TokenKind.PITCH)[1]) + 1,
        "at_bar": int(np.flatnonzero(piece[0].numpy() == BAR)[3]) + 1,
        "at_track": int(track_at[-1]) + 1,
        "after_track": int(track_at[-1]) + 2,
    }[split]
    model = tiny_model(seed=1).eval()
    assert torch.allclose(decode(model, piece, prompt), full_forward(model, piece, "sdpa"), atol=1e-5)


def test_summary_storage_grows_beyond_the_configured_slots():
    tokens = equal_length_rows(2, seed=13)
    model = tiny_model(seed=2, summary_slots=2).eval()
    assert torch.allclose(decode(model, tokens, prompt=2), full_forward(model, tokens, "sdpa"), atol=1e-5)


def test_decoding_past_eos_and_capacity():
    piece = torch.as_tensor(hid_pieces(1, FLEX_LEN - 1, seed=14)[0])[None]
    assert piece[0, -1] == EOS
    model = tiny_model(seed=3).eval()
    decoder = IncrementalDecoder(model, capacity=piece.shape[1], backend="sdpa")
    decoder.prefill(piece[:, :-1])
    assert torch.allclose(decoder.step(piece[:, -1]), full_forward(model, piece, "sdpa")[:, -1], atol=1e-5)
    with pytest.raises(ValueError, match="capacity"):
        decoder.step(piece[:, -1])
