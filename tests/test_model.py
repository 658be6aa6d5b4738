"""MeloFormer model: sizes, backends, causality, RoPE, padding, packing, gradients."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from _music import demo_files, make_score
from meloformer.edits import crop_bars
from meloformer.hid import BAR, BOS, EOS, PAD, TRACK_CONDUCTOR, TRACK_DRUMS, TRACK_PROGRAM0, HIDTokenizer
from meloformer.masks import BlockSparseMask, block_sparse_mask, full_dense_mask, summary_mask_mod
from meloformer.model import (
    NUM_TRACK_EMBEDDINGS,
    SIZES,
    KVCache,
    MeloFormer,
    MeloFormerConfig,
    RuntimeConfig,
    apply_rope,
    attend,
    parameter_counts,
    rope_angles,
    track_embedding_index,
)
from meloformer.row_layout import row_layout

TOK = HIDTokenizer()
# One shape for every compiled-flex call of the session (compiling costs seconds per shape on CPU).
FLEX_LEN, FLEX_SLOTS = 192, 64
TINY = MeloFormerConfig(
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
    max_seq_len=FLEX_LEN,
    summary_slots=FLEX_SLOTS,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_score(rng: np.random.Generator, n_bars: int):
    """A few tracks (drums, bass, piano) of random notes; used when the demo corpus is absent."""
    tracks = []
    for program, is_drum in ((0, True), (33, False), (0, False))[: int(rng.integers(2, 4))]:
        notes = [
            (b * 4 + int(rng.integers(0, 16)) / 4, float(rng.choice([0.25, 0.5, 1.0])), int(rng.integers(36, 84)), 90)
            for b in range(n_bars)
            for _ in range(int(rng.integers(0, 4)))
        ]
        tracks.append((program, is_drum, notes or [(0.0, 1.0, 60, 90)]))
    return make_score(tracks)


def hid_pieces(count: int, max_len: int, seed: int) -> list[np.ndarray]:
    """``count`` HID pieces of at most ``max_len`` tokens: bar crops of demo-corpus files, else random scores."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    files = demo_files()
    for path in rng.permutation(np.array(files, dtype=object))[: 4 * count] if files else []:
        tokens = TOK.encode(path)
        n_bars = TOK.parse(tokens).n_bars
        for width in (3, 2, 1):
            b0 = int(rng.integers(0, max(1, n_bars - width + 1)))
            crop = crop_bars(TOK, tokens, b0, min(n_bars, b0 + width))
            if len(crop) <= max_len:
                out.append(crop.astype(np.int64))
                break
        if len(out) == count:
            return out
    while len(out) < count:
        tokens = TOK.encode(random_score(rng, int(rng.integers(2, 5))))
        if len(tokens) <= max_len:
            out.append(tokens.astype(np.int64))
    return out


def batch(rows: list[np.ndarray], length: int = FLEX_LEN) -> torch.Tensor:
    """Rows padded with PAD to ``length``."""
    out = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r)
    return out


def tiny_model(seed: int = 0, attention_backend="sdpa", gradient_checkpointing="none", **overrides) -> MeloFormer:
    """A tiny model of ``TINY`` with ``overrides``, running with the given run-time knobs."""
    torch.manual_seed(seed)
    runtime = RuntimeConfig(attention_backend=attention_backend, gradient_checkpointing=gradient_checkpointing)
    return MeloFormer(dataclasses.replace(TINY, **overrides), TOK.kinds, runtime)


def test_sizes_and_real_parameter_counts():
    small = MeloFormerConfig.from_size("small", vocab_size=TOK.vocab_size)
    assert (small.n_embd, small.n_layer, small.n_head) == (512, 6, 8)
    counts = parameter_counts(TOK.vocab_size)
    assert list(counts) == list(SIZES) and sorted(counts.values()) == list(counts.values())
    assert counts["small"] == sum(p.numel() for p in MeloFormer(small, TOK.kinds).parameters())
    # Pinned, and hand-checked below against the original's 17M/85M/200M/450M (within 10%).
    pinned = {"small": 17_387_008, "base": 87_434_496, "large": 200_342_528, "xlarge": 447_379_968}
    assert counts == pinned
    for name, target in {"small": 17e6, "base": 85e6, "large": 200e6, "xlarge": 450e6}.items():
        assert abs(counts[name] / target - 1) < 0.1, name
        c = SIZES[name]
        assert c.head_dim == 64 and c.n_head > c.n_kv_head
        ffn = math.ceil(8 * c.n_embd / 3 / 64) * 64
        per_layer = 2 * c.n_embd + c.n_embd * (c.n_head + 2 * c.n_kv_head) * 64 + c.n_embd**2 + 3 * c.n_embd * ffn
        embeddings = (TOK.vocab_size + 131 + 2) * c.n_embd  # tokens (tied head), tracks, summary, final norm
        assert counts[name] == c.n_layer * per_layer + embeddings, name
    with pytest.raises(ValueError, match="unknown size"):
        MeloFormerConfig.from_size("huge")


def test_a_new_width_gets_its_own_ffn_width():
    """Overriding n_embd recomputes the SwiGLU width (8/3 n_embd, rounded up to 64) unless it is given too."""
    assert SIZES["small"].ffn_hidden == 1408
    assert MeloFormerConfig.from_size("small", n_embd=128).ffn_hidden == 384
    assert MeloFormerConfig.from_size("small", n_embd=128, ffn_hidden=1408).ffn_hidden == 1408
    assert MeloFormerConfig.from_size("small", n_layer=2).ffn_hidden == 1408
    assert MeloFormerConfig.from_size("large", n_embd=512).ffn_hidden == SIZES["small"].ffn_hidden


def test_parameter_count_of_a_given_config_counted_by_hand():
    config = MeloFormerConfig(vocab_size=790, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=64)
    embeddings = 790 * 32 + 131 * 32 + 32  # tokens (tied head), none/conductor/drums/128 programs, summary
    attention = 32 * (4 + 2 * 2) * 8 + 32 * 32  # qkv with head size 8, output projection
    block = 32 + attention + 32 + 3 * 32 * 64  # two RMSNorm gains, SwiGLU gate/up/down
    assert embeddings + 2 * block + 32 == 48_096
    assert MeloFormer(config, TOK.kinds).num_parameters() == 48_096
    assert MeloFormerConfig(n_embd=32, n_head=4).ffn_hidden == 128  # 8/3 * 32 = 85.3, up to a multiple of 64
    assert MeloFormerConfig(n_embd=48, n_head=4).ffn_hidden == 128  # 8/3 * 48 = 128 exactly


def test_track_embedding_rows_are_pinned():
    tokens = torch.tensor([0, TRACK_CONDUCTOR, TRACK_DRUMS, TRACK_PROGRAM0, TRACK_PROGRAM0 + 33, TRACK_PROGRAM0 + 127])
    assert track_embedding_index(tokens).tolist() == [0, 1, 2, 3, 36, 130]
    assert NUM_TRACK_EMBEDDINGS == 131


def test_rope_angles_are_pinned():
    """Head size 4, base 10,000: frequencies 1 and 10,000^(-2/4) = 0.01 per position."""
    cos, sin = rope_angles(torch.tensor([[0, 3, 1000]]), 4, 10_000.0)
    angles = [[0.0, 0.0], [3.0, 0.03], [1000.0, 10.0]]
    assert cos.shape == sin.shape == (1, 1, 3, 2)
    assert torch.allclose(cos[0, 0], torch.tensor([[math.cos(a) for a in row] for row in angles]), atol=1e-6)
    assert torch.allclose(sin[0, 0], torch.tensor([[math.sin(a) for a in row] for row in angles]), atol=1e-6)


def test_no_biases_and_a_tied_output_head():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith("bias")]
    vocab_sized = [n for n, p in model.named_parameters() if TOK.vocab_size in p.shape]
    assert vocab_sized == ["tok_emb.weight"]


def test_auto_backend_and_setting_it_after_construction():
    model = tiny_model(attention_backend="auto")
    cpu = torch.device("cpu")
    assert model.backend(cpu) == "sdpa"
    with torch.no_grad():
        assert model.backend(cpu) == "flex"
    model.runtime.attention_backend = "sdpa"
    with torch.no_grad():
        assert model.backend(cpu) == "sdpa"
    model.runtime.attention_backend = "dense"
    with pytest.raises(ValueError, match="attention_backend"):
        model.backend(cpu)


def test_rope_is_a_rotation_whose_scores_depend_only_on_position_differences():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> torch.Tensor:
        pos = torch.tensor([[pq, pk]])
        cos, sin = rope_angles(pos, 16, 10_000.0)
        qr = apply_rope(q, cos[:, :, :1], sin[:, :, :1])
        kr = apply_rope(k, cos[:, :, 1:], sin[:, :, 1:])
        assert torch.allclose(qr.norm(), q.norm()) and torch.allclose(kr.norm(), k.norm())
        return (qr * kr).sum()

    for pq, pk in ((5, 2), (40, 40), (3, 17), (1000, 990)):
        for shift in (1, 37, 5000):
            assert torch.allclose(score(pq, pk), score(pq + shift, pk + shift), atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def _perturb(tokens: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """Replace the token at a random position (not the first) by a random one, structural tokens included."""
    changed = tokens.clone()
    p = int(rng.integers(1, tokens.shape[1]))
    choices = [BAR, BOS, EOS, TRACK_PROGRAM0 + 40, int(rng.integers(0, TOK.vocab_size))]
    new = int(rng.choice([c for c in choices if c != int(tokens[0, p])]))
    changed[:, p] = new
    return changed, p


def _assert_causal(model: MeloFormer, pieces: list[np.ndarray], trials: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(trials):
        tokens = batch([pieces[i % len(pieces)]])
        changed, p = _perturb(tokens, rng)
        both = torch.cat([tokens, changed])
        assert row_layout(both, TOK.kinds).num_slots <= FLEX_SLOTS
        logits = model(both)
        assert torch.equal(logits[0, :p], logits[1, :p]) or torch.allclose(logits[0, :p], logits[1, :p], atol=1e-5), p
        assert not torch.allclose(logits[0, p], logits[1, p], atol=1e-5), "the changed token itself must matter"


def test_causality_sdpa_with_gradients():
    model = tiny_model().train()
    assert torch.is_grad_enabled() and model.backend(torch.device("cpu")) == "sdpa"
    _assert_causal(model, hid_pieces(4, FLEX_LEN, seed=1), trials=12, seed=1)


def test_causality_flex_forward():
    model = tiny_model(attention_backend="flex").eval()
    with torch.no_grad():
        _assert_causal(model, hid_pieces(4, FLEX_LEN, seed=2), trials=6, seed=2)


def test_flex_and_sdpa_agree_in_forward():
    pieces = hid_pieces(4, FLEX_LEN // 2, seed=3)
    tokens = batch([np.concatenate(pieces[:2]), pieces[2]])
    model = tiny_model().eval()
    with torch.no_grad():
        sdpa = model(tokens, ctx=model.prepare(tokens, backend="sdpa"))
        flex = model(tokens, ctx=model.prepare(tokens, backend="flex"))
    assert torch.allclose(sdpa, flex, atol=1e-5)


def test_sdpa_gradients_pass_gradcheck_in_float64():
    model = tiny_model(n_embd=8, n_head=2, n_kv_head=1, summary_slots=16).double()
    tokens = batch(hid_pieces(1, 48, seed=4), 48)
    ctx = model.prepare(tokens, backend="sdpa")
    weights = torch.randn(TOK.vocab_size, dtype=torch.float64)
    names = ("blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight", "summary_emb")
    params = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def f(*values: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, dict(zip(names, values)), (tokens,), {"ctx": ctx})
        return logits @ weights

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)


def test_padded_rows_have_no_nan_and_padding_changes_nothing():
    pieces = hid_pieces(2, 120, seed=5)
    model = tiny_model()
    padded = batch(pieces)
    logits = model(padded)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        for i, piece in enumerate(pieces):
            alone = model(batch([piece], len(piece)))
            assert torch.allclose(logits[i, : len(piece)], alone[0], atol=1e-5)
        assert torch.isfinite(model(batch([np.array([PAD])]))).all()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_rows_give_each_piece_its_logits_alone(backend: str):
    a, b = hid_pieces(2, FLEX_LEN // 2, seed=6)
    model = tiny_model().eval()
    with torch.no_grad():
        tokens = batch([np.concatenate([a, b]), b])
        logits = model(tokens, ctx=model.prepare(tokens, backend=backend))
        alone = batch([a, b])
        alone = model(alone, ctx=model.prepare(alone, backend=backend))
    assert torch.allclose(logits[0, : len(a)], alone[0, : len(a)], atol=1e-5)
    assert torch.allclose(logits[0, len(a) : len(a) + len(b)], alone[1, : len(b)], atol=1e-5)
    assert torch.allclose(logits[1, : len(b)], alone[1, : len(b)], atol=1e-5)


@pytest.mark.parametrize("attention", ["causal", "local"])
def test_loader_rows_with_slots_serve_the_variants_without_slots(attention: str):
    tokens = packed_rows(seed=13, length=FLEX_LEN)
    model = tiny_model(attention=attention).eval()
    with torch.no_grad():
        given = model(tokens, ctx=model.prepare(tokens, rows=row_layout(tokens, TOK.kinds, TINY.summary_slots)))
        assert torch.equal(given, model(tokens))


def test_side_channels_computed_beforehand_are_used():
    """``prepare(rows=...)`` (the DataLoader's layout) uses the given rows instead of computing its own: rows
    whose second piece is laid out as if it had no BOS (one document) change the second piece's logits."""
    a, b = hid_pieces(2, FLEX_LEN // 2, seed=7)
    tokens = batch([np.concatenate([a, b])], len(a) + len(b))
    one_document = tokens.clone()
    one_document[0, len(a)] = tokens[0, len(a) + 1]  # the second BOS replaced: a layout of one document
    model = tiny_model().eval()
    with torch.no_grad():
        own = row_layout(tokens, TOK.kinds, TINY.summary_slots)
        assert torch.equal(model(tokens, ctx=model.prepare(tokens, rows=own)), model(tokens))
        other = row_layout(one_document, TOK.kinds, TINY.summary_slots)
        given = model(tokens, ctx=model.prepare(tokens, rows=other))
        assert not torch.allclose(given[0, len(a) + 1 :], model(tokens)[0, len(a) + 1 :], atol=1e-4)


def test_more_segments_than_summary_slots_rounds_up():
    pieces = hid_pieces(2, FLEX_LEN, seed=8)
    tokens = batch(pieces)
    model = tiny_model(summary_slots=4).eval()
    with torch.no_grad():
        ctx = model.prepare(tokens, backend="sdpa")
        assert ctx.rows.num_slots == 128
        few = model(tokens, ctx=ctx)
        model.config.summary_slots = 200
        assert torch.allclose(few, model(tokens), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    tokens = batch(hid_pieces(2, FLEX_LEN, seed=9))
    grads = {}
    for mode in ("none", "ffn", "block"):
        model = tiny_model(gradient_checkpointing=mode)
        model(tokens).logsumexp(-1).mean().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads["none"], grads["ffn"], atol=1e-6)
    assert torch.allclose(grads["none"], grads["block"], atol=1e-6)


def test_block_checkpointing_fills_kv_caches_as_a_plain_forward():
    """A checkpointed block re-runs in backward and writes its keys and values again: the same ones to the same
    cache entries, so caches and gradients equal those without checkpointing."""
    tokens = batch(hid_pieces(1, FLEX_LEN, seed=11))
    caches, grads = {}, {}
    for mode in ("block", "none"):
        model = tiny_model(gradient_checkpointing=mode)
        ctx = model.prepare(tokens)
        ctx = dataclasses.replace(ctx, write=torch.arange(ctx.rows.length).expand(len(tokens), -1))
        size = ctx.rows.length
        caches[mode] = [
            KVCache.empty(model.config, len(tokens), size, tokens.device, torch.float32) for _ in model.blocks
        ]
        model(tokens, ctx=ctx, caches=caches[mode]).logsumexp(-1).mean().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in zip(caches["block"], caches["none"]))
    assert all(c.k.abs().sum() > 0 and c.v.abs().sum() > 0 for c in caches["none"])
    assert torch.allclose(grads["block"], grads["none"], atol=1e-6)


def test_rows_longer_than_max_seq_len_are_refused():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.full((1, 17), BOS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU (torch 2.13)")
def test_flex_and_sdpa_agree_in_gradients_on_cuda():
    tokens = batch(hid_pieces(2, FLEX_LEN, seed=10)).cuda()
    grads = []
    for backend in ("sdpa", "flex"):
        model = tiny_model(attention_backend=backend).cuda()
        model(tokens).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def window_rows(seed: int = 5) -> torch.Tensor:
    """Two rows of one piece each, both longer than 128 tokens: the ``window`` variant at 128 spans two chunks."""
    pieces = [p for p in hid_pieces(16, FLEX_LEN, seed=seed) if len(p) > 140][:2]
    assert len(pieces) == 2, "the demo corpus should give crops longer than 140 tokens"
    return batch(pieces, FLEX_LEN)


def packed_rows(seed: int, length: int) -> torch.Tensor:
    """Two rows: three or more pieces packed to exactly ``length`` tokens, and two pieces then padding."""
    pieces = hid_pieces(8, length // 3, seed=seed)
    packed = np.concatenate(pieces)[:length]
    return batch([packed, np.concatenate(pieces[-2:])], length)


@pytest.mark.parametrize(("query_block", "key_block"), [(16, 16), (64, 16), (128, 32)])
def test_block_sparse_attention_equals_sdpa_with_the_dense_mask(query_block: int, key_block: int):
    """Outputs and gradients of q, k, v equal the dense-mask SDPA on packed rows with padding (float64)."""
    tokens = packed_rows(seed=11, length=300)  # not a multiple of any block: the last blocks are partial
    rows = row_layout(tokens, TOK.kinds, 40)
    mod = summary_mask_mod(rows)
    sparse, dense = block_sparse_mask(mod, rows, query_block, key_block), full_dense_mask(mod, rows)
    assert (rows.doc[0, : rows.num_regular].unique() >= 0).sum() >= 3 and (tokens[1] == PAD).any()
    assert len(sparse.calls) > 1
    torch.manual_seed(0)
    q = torch.randn(2, 4, rows.length, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, rows.length, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    out = attend(q, k, v, sparse)
    assert torch.allclose(out, reference, atol=1e-12)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    sparse_grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, sparse_grads))


@pytest.mark.parametrize("attention", ["summary", "window", "causal", "local"])
def test_block_sparse_training_equals_the_dense_mask_in_loss_and_gradients(attention: str):
    """The whole model, every attention variant: the sdpa backend (block-sparse) gives the dense-mask loss and
    parameter gradients (``window`` at 128 tokens, so rows span several windows)."""
    tokens = window_rows() if attention == "window" else packed_rows(seed=12, length=FLEX_LEN)
    model = tiny_model(attention=attention, token_window=128).double()
    results = []
    for backend in ("sdpa", "dense"):
        ctx = model.prepare(tokens, backend=backend)
        assert isinstance(ctx.mask, BlockSparseMask if backend == "sdpa" else torch.Tensor)
        loss = model(tokens, ctx=ctx).logsumexp(-1).mean()
        model.zero_grad()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (dense_loss, dense_grads) = results
    assert torch.allclose(loss, dense_loss, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, dense_grads))
