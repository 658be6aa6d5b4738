"""The sampler's token budget, exactly: what a bar still needs (``BarSyntax.tokens_to_end``), the reserve for
the tracks still to open, and each segment's share of the free tokens."""

from __future__ import annotations

import copy

import pytest

from meloformer import sampler
from meloformer.hid import BAR, TRACK_CONDUCTOR, TRACK_DRUMS, TRACK_PROGRAM0, BarSyntax, HIDTokenizer, TokenKind
from meloformer.sampler import GenerationRequest, generate

TOK = HIDTokenizer()
FIRST_OF_KIND = {kind: int((TOK.kinds == kind).argmax()) for kind in TokenKind}
BAR_LENGTH = 48


def fewest_to_end(syntax: BarSyntax) -> int:
    """The fewest tokens after which the bar may end, found by walking ``next_kinds`` (breadth first)."""
    frontier, depth = [syntax], 0
    while not any(state.may_end for state in frontier):
        depth, following = depth + 1, []
        for state in frontier:
            for kind in state.next_kinds():
                if kind == TokenKind.POS:
                    free = state.positions(BAR_LENGTH)
                    if not free:
                        continue
                    token = TOK.pos0 + free[0]
                else:
                    token = FIRST_OF_KIND[kind]
                nxt = copy.copy(state)
                nxt.advance(token)
                following.append(nxt)
        frontier = following
        assert depth < 10 and frontier
    return depth


@pytest.mark.parametrize("track", [TRACK_DRUMS, TRACK_PROGRAM0, TRACK_PROGRAM0 + 33, TRACK_CONDUCTOR])
@pytest.mark.parametrize("first_bar", [True, False])
def test_tokens_to_end_is_the_shortest_way_to_end_the_bar(track, first_bar):
    """Along a bar of two notes (drum bars have no ``Dur``), every state's count equals the walk's."""
    syntax = BarSyntax(TOK, track, first_bar)
    note = [TokenKind.POS, TokenKind.PITCH, TokenKind.DUR, TokenKind.VEL, TokenKind.POS, TokenKind.PITCH]
    steps = 0
    for kind in note if track != TRACK_CONDUCTOR else [TokenKind.TIMESIG, TokenKind.POS, TokenKind.TEMPO]:
        assert syntax.tokens_to_end() == fewest_to_end(syntax), (TOK.describe([track]), kind, steps)
        if kind not in syntax.next_kinds():
            continue  # Dur in a drum bar, TimeSig in a later conductor bar
        syntax.advance(TOK.pos0 + 4 * steps if kind == TokenKind.POS else FIRST_OF_KIND[kind])
        steps += 1
    assert syntax.tokens_to_end() == fewest_to_end(syntax)
    assert steps >= 3


@pytest.mark.parametrize("bars", [1, 2])
def test_a_piece_never_ends_over_its_budget(model, bars):
    """Tight budgets, several tracks still to open: each one's Track token is held back with its bars."""
    instruments = [TRACK_DRUMS, TRACK_PROGRAM0, TRACK_PROGRAM0 + 33, TRACK_PROGRAM0 + 73]
    for budget in (25, 30) if bars == 1 else (35,):
        for seed in range(4):
            request = GenerationRequest(bars=bars, instruments=instruments, max_tokens=budget)
            tokens = generate(model, TOK, request, seed=seed)
            assert len(tokens) <= budget, (budget, seed, TOK.describe(tokens))
            assert [len(bars_) for _, bars_ in TOK.parse(tokens).tracks] == [bars] * 4


def test_each_segment_gets_an_equal_share_of_the_free_tokens(model, monkeypatch):
    """At every ``Bar``, the segment may spend the free tokens divided by the segments still to write, itself
    included (counted here from the finished piece), so later bars are not starved."""
    seen = []
    opened = sampler._Budget.opened_segment

    def spy(self, used, queue):
        opened(self, used, queue)
        seen.append((used, self.segment_free, self.segment_share))

    monkeypatch.setattr(sampler._Budget, "opened_segment", spy)
    request = GenerationRequest(bars=4, instruments=[TRACK_PROGRAM0, TRACK_DRUMS], max_tokens=200)
    tokens = generate(model, TOK, request, seed=0).tolist()
    bar_at = [i for i, token in enumerate(tokens) if token == BAR]
    assert len(bar_at) == 12
    checked = 0
    for used, free, share in seen:
        if tokens[used - 1] == BAR:
            still = len(bar_at) - bar_at.index(used - 1)  # this segment and every later one
            assert share == free // still, (used, free, share, still)
            checked += 1
    assert checked == 12 and max(free for _, free, _ in seen) > 40
