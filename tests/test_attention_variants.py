"""The ``attention`` model setting: ``summary`` (the product), ``window`` (its tile-friendly form), ``causal`` (full
attention) and ``local`` (RR only). ``window`` runs at 128 tokens here, so the short test rows span several windows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_decode import decode, full_forward
from test_model import FLEX_LEN, batch, hid_pieces, tiny_model, window_rows

from meloformer.hid import PAD

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = ("summary", "window", "causal", "local")


def packed_rows() -> torch.Tensor:
    """Two rows of FLEX_LEN tokens, each two or three demo pieces packed back to back, then padding."""
    pieces = hid_pieces(5, FLEX_LEN // 3, seed=5)
    return batch([np.concatenate(pieces[:2]), np.concatenate(pieces[2:])])


def dense(model, tokens: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The model's boolean mask ``[B, L + S, L + S]`` for ``tokens``, evaluated pair by pair, and its rows."""
    rows = model.row_layout(tokens)
    idx = torch.arange(rows.length)
    b = torch.arange(rows.batch_size)[:, None, None]
    mask = model.mask_mod(rows)(b, torch.zeros(1, 1, 1, dtype=torch.long), idx[None, :, None], idx[None, None, :])
    return mask, rows


def test_causal_is_plain_causal_attention_within_documents():
    model = tiny_model(attention="causal")
    tokens = packed_rows()
    mask, rows = dense(model, tokens)
    assert rows.num_slots == 0
    doc = rows.doc
    q, kv = torch.arange(rows.length)[:, None], torch.arange(rows.length)[None, :]
    expected = ((doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0) & (kv <= q)) | (q == kv)
    assert torch.equal(mask, expected)
    assert (doc.unique() >= 0).sum() >= 2, "rows should pack several documents"


def test_causal_model_equals_each_document_alone():
    """Packing changes nothing: a document's logits equal those of the document by itself, at any offset."""
    model = tiny_model(attention="causal").eval()
    pieces = hid_pieces(2, FLEX_LEN // 2, seed=3)
    with torch.no_grad():
        packed = model(batch([np.concatenate(pieces)]))[0]
        first = model(batch([pieces[0]]))[0, : len(pieces[0])]
        second = model(batch([pieces[1]]))[0, : len(pieces[1])]
    assert torch.allclose(packed[: len(pieces[0])], first, atol=1e-5)
    assert torch.allclose(packed[len(pieces[0]) : len(pieces[0]) + len(pieces[1])], second, atol=1e-5)


def test_local_sees_no_slot_and_keeps_exactly_the_summary_rr_rules():
    tokens = packed_rows()
    local, rows = dense(tiny_model(attention="local"), tokens)
    summary, summary_rows = dense(tiny_model(attention="summary"), tokens)
    n = tokens.shape[1]
    assert rows.num_slots == 0 and summary_rows.num_slots > 0
    # Among regular tokens the local mask is the summary mask; the summary mask adds only slot columns/rows.
    assert torch.equal(local, summary[:, :n, :n])
    assert summary[:, :n, n:].any(), "summary attention should reach slots"
    causal, _ = dense(tiny_model(attention="causal"), tokens)
    assert (local <= causal).all() and (local != causal).any(), "local should see a strict subset of causal"


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize(
    ("attention", "slot_input"), [(a, "learned") for a in VARIANTS] + [("summary", "segment_mean")]
)
def test_causality_of_every_variant(attention: str, slot_input: str, backend: str):
    """Changing the token at p changes no logit before p, and changes some logit after it; also for slots that
    start from their segment's mean embedding (the slot holding p is read only after p's segment has ended)."""
    model = tiny_model(attention=attention, slot_input=slot_input, token_window=128).eval()
    tokens = window_rows()[:1] if attention == "window" else packed_rows()[:1]
    with torch.no_grad():
        base = model(tokens, ctx=model.prepare(tokens, backend=backend))
        for p in (7, 40, 101, 135):
            changed = tokens.clone()
            changed[0, p] = (changed[0, p] + 1) % model.config.vocab_size
            out = model(changed, ctx=model.prepare(changed, backend=backend))
            assert torch.allclose(out[:, :p], base[:, :p], atol=1e-5), f"{attention}: a logit before {p} changed"
            assert not torch.allclose(out[:, p:], base[:, p:], atol=1e-5)


def test_segment_mean_slots_carry_their_segment_from_the_first_layer():
    """With ``segment_mean`` a slot's input is the learned vector plus the mean embedding of its segment's
    tokens (checked against a hand computation); with ``learned`` it does not depend on the tokens."""
    model = tiny_model(slot_input="segment_mean")
    tokens = packed_rows()[:1]
    rows = model.row_layout(tokens)
    n = tokens.shape[1]
    slots = model.embed_slots(tokens, rows)
    learned = dataclasses.replace(model.config, slot_input="learned")
    model.config = learned
    plain = model.embed_slots(tokens, rows)
    for s in (0, 3, int(rows.segment[0, :n].max())):
        members = tokens[0, :][rows.segment[0, :n] == s]
        assert len(members) > 0
        expected = plain[0, s] + model.tok_emb(members).mean(0)
        assert torch.allclose(slots[0, s], expected, atol=1e-6)
    assert torch.equal(plain, model.embed_slots(tokens.roll(1, dims=1), rows))


@pytest.mark.parametrize(
    ("attention", "slot_input"),
    [("causal", "learned"), ("local", "learned"), ("summary", "segment_mean"), ("window", "learned")],
)
def test_incremental_decoding_of_the_ablations_equals_full_forward(attention: str, slot_input: str):
    model = tiny_model(attention=attention, slot_input=slot_input, token_window=128).eval()
    pieces = [p.numpy() for p in window_rows()] if attention == "window" else hid_pieces(2, FLEX_LEN, seed=11)
    n = min(int((p != PAD).sum()) for p in pieces)
    tokens = torch.as_tensor(np.stack([p[:n] for p in pieces]))
    assert torch.allclose(decode(model, tokens, prompt=3), full_forward(model, tokens, "sdpa"), atol=1e-5)


def test_window_differs_from_summary_only_where_its_rules_do():
    """``window`` keeps the summary mask's slot rows (SR, SS); among regular tokens it sees a subset of causal
    attention that includes each token's own chunk, and it reaches slots only beyond its window."""
    tokens = torch.cat([window_rows(), packed_rows()])
    window, rows = dense(tiny_model(attention="window", token_window=128), tokens)
    summary, summary_rows = dense(tiny_model(attention="summary"), tokens)
    causal, _ = dense(tiny_model(attention="causal"), tokens)
    n = tokens.shape[1]
    assert rows.num_slots == summary_rows.num_slots > 0
    assert torch.equal(window[:, n:], summary[:, n:])
    assert (window[:, :n, :n] <= causal).all() and (window[:, :n, :n] != causal).any()
    assert window[:, :n, n:].any() and (window[:, :n, n:] <= summary[:, :n, n:]).all()


def test_window_must_be_whole_chunks():
    with pytest.raises(ValueError, match="token_window must be a positive multiple of 128"):
        tiny_model(attention="window", token_window=200).mask_mod(tiny_model().row_layout(packed_rows()))


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny_model(attention="sparse").mask_mod(tiny_model().row_layout(packed_rows()))
