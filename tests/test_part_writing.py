"""The parallels training signal: which pitches would move in parallel fifths or octaves (``part_writing``), and
the unlikelihood term that lowers their probability (``MeloFormerModule(parallels_weight=...)``)."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from _music import demo_files, quarter_note
from meloformer.datamodules.stream import CollateWithPlan
from meloformer.fill import fill_row
from meloformer.hid import BAR, BOS, EOS, PAD, TRACK_CONDUCTOR, TRACK_DRUMS, TRACK_PROGRAM0, HIDTokenizer, TokenKind
from meloformer.layout import layout
from meloformer.module import MeloFormerModule, WithParallelPitches, parallels_unlikelihood
from meloformer.part_writing import parallel_pitches
from meloformer.steering import VoiceLeading

TOK = HIDTokenizer()
CHOIR = TRACK_PROGRAM0 + 52


note = partial(quarter_note, TOK)


def duet(alto: tuple[int, int], upper: int = CHOIR, lower: int = CHOIR) -> np.ndarray:
    """One 4/4 bar: the soprano sings C5 then D5 (positions 0 and 12), the alto ``alto`` at the same onsets."""
    conductor = [BAR, TOK.timesig0 + TOK.time_signatures.index((4, 4)), TOK.pos0, TOK.tempo0 + 20]
    soprano = [upper, BAR, *note(0, 72), *note(12, 74)]
    second = [lower, BAR, *note(0, alto[0]), *note(12, alto[1])]
    return np.array([BOS, upper, lower, TRACK_CONDUCTOR, *conductor, *soprano, *second, EOS])


def forbidden_at_pitches(tokens: np.ndarray) -> list[set[int]]:
    """The forbidden pitches at each ``Pitch`` token, in order."""
    out = parallel_pitches(TOK, tokens)
    return [set(np.flatnonzero(out[i]).tolist()) for i in np.flatnonzero(TOK.kinds[tokens] == TokenKind.PITCH)]


def test_a_fifth_or_octave_kept_in_the_same_direction_is_parallel():
    """F4 under C5 is a fifth: as the soprano rises to D5, the alto's rising fifths below or above it (G4, A5,
    ...) are parallel; falling (G3) or any other pitch is not. From C4, the octaves and unison of D5 rising."""
    assert forbidden_at_pitches(duet((65, 69))) == [set(), set(), set(), {67, 81, 93, 105, 117}]
    assert forbidden_at_pitches(duet((60, 64))) == [set(), set(), set(), {62, 74, 86, 98, 110, 122}]


def test_the_pitch_the_music_writes_is_never_forbidden():
    """Real parallels stay learnable: the alto's own G4 is not among the pitches it is trained away from."""
    assert forbidden_at_pitches(duet((65, 67)))[3] == {81, 93, 105, 117}


def test_drums_the_first_voice_and_a_voice_that_holds_have_no_parallels():
    assert forbidden_at_pitches(duet((65, 69), lower=TRACK_DRUMS)) == [set()] * 4
    assert forbidden_at_pitches(duet((65, 69), upper=TRACK_DRUMS)) == [set()] * 4
    held = duet((65, 69))
    held[np.flatnonzero(held == TOK.pitch0 + 74)] = TOK.pitch0 + 72  # the soprano repeats C5: no motion
    assert forbidden_at_pitches(held)[3] == set()


def test_a_row_packs_pieces_each_on_its_own_and_skips_a_fill_pass():
    """Packed pieces are read one by one; padding and a piece with a fill pass (bars out of order) get none."""
    one = duet((65, 69))
    fill = fill_row(TOK, one, 1, 0, 0)
    row = np.concatenate([one, fill, one, [PAD] * 5])
    out = parallel_pitches(TOK, np.stack([row, row]))
    alone = parallel_pitches(TOK, one)
    assert out.shape == (2, len(row), 128)
    assert (out[1, : len(one)] == alone).all() and alone.any()
    assert not out[0, len(one) : len(one) + len(fill)].any()
    assert (out[0, len(one) + len(fill) : -5] == alone).all() and not out[0, -5:].any()


def test_the_forbidden_pitches_are_ones_voice_leading_steering_refuses():
    """On real chorales, every pitch marked at a Pitch token is one ``VoiceLeading`` refuses there (the same
    rule, counted the same way), and the marks are not rare."""
    marked = 0
    for path in demo_files()[:3]:
        tokens = TOK.encode(path)
        lay = layout(tokens, TOK.kinds)
        out = parallel_pitches(TOK, tokens)
        pitches = np.flatnonzero((lay.kind == TokenKind.PITCH) & (lay.bar < 4) & (lay.track >= 2))
        for i in pitches:
            group = np.flatnonzero((lay.onset_group == lay.onset_group[i]) & (lay.kind == TokenKind.POS))
            onset = int(tokens[group[0]] - TOK.pos0)
            _, mask = VoiceLeading(TOK)(int(lay.bar[i]), int(lay.track[i]), onset, tokens[:i])
            if mask is None:
                assert not out[i].any()
                continue
            allowed = mask[TOK.pitch0 : TOK.pitch0 + 128]
            assert not (out[i] & allowed).any(), (path.name, i)
            marked += int(out[i].any())
    assert marked >= 10


def test_the_unlikelihood_is_minus_log_of_the_mass_left_off_the_forbidden_pitches():
    logits = torch.zeros(1, 2, TOK.vocab_size)
    forbidden = torch.zeros(1, 2, 128, dtype=torch.bool)
    forbidden[0, 1, [60, 62]] = True
    p = 2 / TOK.vocab_size
    expected = torch.tensor([[-np.log(1 - p)]], dtype=torch.float32)
    assert torch.allclose(parallels_unlikelihood(logits, forbidden, TOK.pitch0), expected)
    assert parallels_unlikelihood(logits, torch.zeros_like(forbidden), TOK.pitch0).abs().max() == 0


def test_training_with_the_weight_lowers_the_forbidden_mass(tiny_model):
    """The loader's plan adds the marks; the same 30 steps on the same two duets leave far less probability on
    the marked pitches with the term than without it."""
    tokens = torch.from_numpy(np.stack([duet((65, 69)), duet((60, 64))]).astype(np.int64))
    forbidden = torch.from_numpy(parallel_pitches(TOK, tokens.numpy()))
    masses = {}
    for weight in (0.0, 20.0):
        torch.manual_seed(0)
        module = MeloFormerModule(**tiny_model, parallels_weight=weight, lr=1e-2, warmup_steps=0)
        plan = module.batch_plan()
        assert isinstance(plan, WithParallelPitches) == (weight > 0)
        loader = DataLoader([{"tokens": row} for row in tokens], batch_size=2, collate_fn=CollateWithPlan(plan))
        trainer = pl.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)  # fmt: skip
        trainer.fit(module, loader)
        assert ("train/parallels" in trainer.callback_metrics) == (weight > 0)
        with torch.no_grad():
            masses[weight] = float(parallels_unlikelihood(module.model(tokens), forbidden, TOK.pitch0).sum())
    assert masses[20.0] < 0.5 * masses[0.0], masses
