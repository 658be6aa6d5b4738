"""Does a forced chord progression steer the music? Chord agreement with and without ``--chords``.

Samples pieces from a trained checkpoint with a progression forced in the conductor, and the same number
without one (the model picks its own chords), and compares the notes written with the requested chords:
``chord_tones`` is the share of pitched notes whose pitch class belongs to their bar's requested chord
(a triad holds 3 of 12 pitch classes), ``agreement`` the share of bars whose chord, re-detected from the
notes by the tokenizer's template matching (as when encoding a MIDI file), is the requested one. The
baseline is the unsteered samples, in the same run. The chord tokens themselves always equal the request
(tested); this measures whether the model writes notes that fit them.

    python bench/chords.py [--ckpt_path CKPT_OR_MODEL_FOLDER] [--samples 8] [--bars 8]   # default: the shipped model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from meloformer.chords import progression
from meloformer.hid import CHORD_QUALITIES, NOTE_COLUMNS, TRACK_PROGRAM0, HIDTokenizer
from meloformer.module import load_checkpoint, module_from_folder
from meloformer.pretrained import default_model_folder
from meloformer.sampler import GenerationRequest, generate

REPO = Path(__file__).resolve().parents[1]


def detected_chords(tok: HIDTokenizer, tokens: np.ndarray) -> list[int]:
    """Per bar, the chord the encoder finds in the notes (-1: none)."""
    piece = tok.parse(tok.encode(tok.decode(tokens)))
    found = dict(piece.conductor_events(tok)[2])
    return [found.get(b, -1) for b in range(piece.n_bars)]


def chord_tones(tok: HIDTokenizer, tokens: np.ndarray, wanted: list[int]) -> tuple[int, int]:
    """(notes whose pitch class is in their bar's wanted chord, pitched notes)."""
    notes = tok.note_table(tokens)  # every instrument here is pitched
    bar, pitch = notes[:, NOTE_COLUMNS.index("bar")], notes[:, NOTE_COLUMNS.index("pitch")]
    tones = [{(tok.chords[c][0] + k) % 12 for k in CHORD_QUALITIES[tok.chords[c][1]]} for c in wanted]
    return sum(int(p % 12) in tones[b] for b, p in zip(bar.tolist(), pitch.tolist())), len(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default=str(default_model_folder()), help="a checkpoint or a model folder")
    parser.add_argument("--chords", nargs="+", default=["C", "G", "Am", "F"])
    parser.add_argument("--bars", type=int, default=8)
    parser.add_argument("--instruments", type=int, nargs="+", default=[52, 52, 53], help="GM programs")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chords.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    module = module_from_folder(args.ckpt_path) if Path(args.ckpt_path).is_dir() else load_checkpoint(args.ckpt_path)
    tok, model = module.tokenizer, module.model
    wanted = progression(tok, args.chords, args.bars)
    instruments = [TRACK_PROGRAM0 + p for p in args.instruments]
    rows = {}
    for name, chords in (("forced", args.chords), ("free", None)):
        request = GenerationRequest(bars=args.bars, instruments=instruments, chords=chords, top_p=0.95)
        start = time.perf_counter()
        hits = bars = in_chord = notes = 0
        for seed in range(args.samples):
            tokens = generate(model, tok, request, seed=seed)
            hits += sum(f == w for f, w in zip(detected_chords(tok, tokens), wanted))
            bars += len(wanted)
            tones, count = chord_tones(tok, tokens, wanted)
            in_chord, notes = in_chord + tones, notes + count
        rows[name] = {
            "chord_tones": in_chord / max(notes, 1),
            "agreement": hits / bars,
            "notes": notes,
            "bars": bars,
            "seconds": time.perf_counter() - start,
        }

    print(f"{args.samples} samples x {args.bars} bars, progression {' '.join(args.chords)}, {args.ckpt_path}")
    print(f"{'chords':<8} {'chord tones':>12} {'agreement':>10} {'notes':>6} {'s':>7}")
    for name, row in rows.items():
        print(
            f"{name:<8} {row['chord_tones']:>12.3f} {row['agreement']:>10.3f} {row['notes']:>6} {row['seconds']:>7.1f}"
        )
    ratio = rows["forced"]["chord_tones"] / max(rows["free"]["chord_tones"], 1e-9)
    print(f"chord tones, forced / free: {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"chords": args.chords, "bars": args.bars, "samples": args.samples, "rows": rows, "ratio": ratio}
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
