"""The two-sample report of `meloformer evaluate --generated GEN --against REAL --out DIR`.

Generated and real pieces are measured alike (``meloformer.features``). The report then compares the two sets:

- per feature, its distribution in each set (mean, standard deviation, median, count), the meters, and
  every piece's values;
- the Fréchet distance between Gaussians fitted to ``FEATURE_VECTOR``, with each feature z-scored by the
  real set's mean and standard deviation. Its standard error comes from a bootstrap over pieces. Its floor
  is the distance between two random halves of the real set, averaged over ``SPLITS`` halvings. Halves
  have fewer pieces a side, so the floor is, if anything, biased upwards;
- per feature, how far apart the two sets lie: the AUC of the feature alone, the chance that a generated
  piece's value exceeds a real piece's (ties count half; 0.5: no tendency, 0 or 1: no overlap), so a
  separating classifier can be read back to the features that separate;
- a two-sample classifier: a random forest telling generated from real pieces by ``FEATURE_VECTOR``. The
  report gives its balanced accuracy under stratified k-fold cross-validation, averaged over ``REPEATS``
  random splits (0.5: the sets cannot be told apart), and the same for two real halves (over ``SPLITS``
  halvings) as the control. It needs scikit-learn (``pip install meloformer[eval]``); without it the report
  says so in one line and gives the rest.

``write_report`` writes ``report.json`` (strict JSON: null, never NaN), ``report.md``,
``distributions.png`` and ``self_similarity.png``, each file written whole.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import symusic

from meloformer.edits import crop_bars
from meloformer.features import FEATURE_VECTOR, feature_vector, piece_features, self_similarity
from meloformer.hid import PITCH_CLASS_NAMES, HIDError, HIDTokenizer, read_midi

SUMMARISED = (
    *FEATURE_VECTOR,
    "voices",
    "bars",
    "chord_tone_rate",
    "chord_tone_rate_shifted",
    "chord_tone_rate_own",
    "bass_on_root",
    "key_agrees",
    "leap_in",
    "leap_out",
    "region_in_range",
    "region_consonance",
)
NO_SKLEARN = "two-sample classifier skipped: it needs scikit-learn (pip install meloformer[eval])"
MATRICES = 3  # self-similarity matrices plotted per set
SPLITS = 5  # random halvings of the real set behind the floor and the control
REPEATS = 10  # k-fold splits the classifier's accuracy is averaged over


def midi_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".mid", ".midi"))


def marker_chords(tok: HIDTokenizer, score: symusic.Score, tokens: np.ndarray) -> list[int] | None:
    """A chord index per bar of ``tokens`` (the encoding of ``score``) from the score's chord markers
    (``Cmaj``, ``Amin``: what `meloformer generate` writes), or None when it has none."""
    names = {PITCH_CLASS_NAMES[root] + quality: i for i, (root, quality) in enumerate(tok.chords)}
    marks = [(m.time, names[m.text]) for m in score.markers if m.text in names]
    if not marks:
        return None
    starts = tok.parse(tokens).bar_starts(tok)
    chords = [-1] * len(starts)
    for tick, chord in marks:
        bar = int(np.searchsorted(starts, round(tick * tok.resolution / score.ticks_per_quarter), side="right")) - 1
        chords[max(bar, 0)] = chord
    return chords


def read_folder(
    folder: str | Path,
    tok: HIDTokenizer,
    region: tuple[int, int, int] | None = None,
    key: str | None = None,
    bars: int | None = None,
) -> tuple[list[dict], dict[str, str], list[np.ndarray]]:
    """Every readable MIDI file's features (chords from its markers, else the tokenizer's detection), the
    files skipped with why, and the tokens of the first ``MATRICES`` pieces. ``bars``: only the first bars."""
    rows, skipped, kept = [], {}, []
    for path in midi_files(folder):
        try:
            score = read_midi(path)
            tokens = tok.encode(score)
            chords = marker_chords(tok, score, tokens)
            if bars is not None and bars < tok.parse(tokens).n_bars:
                tokens, chords = crop_bars(tok, tokens, 0, bars), chords and chords[:bars]
            features = piece_features(tok, tokens, chords, region, key)
        except HIDError as err:
            skipped[str(path)] = str(err)
            continue
        source = "markers" if chords is not None else "detected"
        rows.append({"file": str(path.relative_to(folder)), "chord_source": source, **features})
        if len(kept) < MATRICES:
            kept.append(tokens)
    if not rows:
        raise ValueError(f"{folder}: no readable MIDI files ({len(skipped)} skipped)")
    return rows, skipped, kept


def summary(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"pieces": len(rows)}
    for name in SUMMARISED:
        values = np.array([r[name] for r in rows if r.get(name) is not None], dtype=float)
        out[name] = {
            "mean": float(values.mean()) if len(values) else None,
            "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            "median": float(np.median(values)) if len(values) else None,
            "n": len(values),
        }
    out["meters"] = dict(Counter(r["meter"] for r in rows).most_common())
    out["chord_source"] = dict(Counter(r["chord_source"] for r in rows)) if "chord_source" in rows[0] else {}
    return out


def separation(gen_rows: list[dict], real_rows: list[dict]) -> dict[str, float | None]:
    """Per summarised feature, P(generated value > real value) + P(equal) / 2 over all pairs of pieces (the
    AUC of the feature alone); None where either set has no value."""
    out: dict[str, float | None] = {}
    for name in SUMMARISED:
        g, r = ([row[name] for row in rows if row.get(name) is not None] for rows in (gen_rows, real_rows))
        if not g or not r:
            out[name] = None
            continue
        g, r = np.array(g, dtype=float)[:, None], np.array(r, dtype=float)[None, :]
        out[name] = float((g > r).mean() + (g == r).mean() / 2)
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to the rows of ``a`` and ``b``."""
    diff = a.mean(axis=0) - b.mean(axis=0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Tr (Sa Sb)^1/2 = Tr (Sa^1/2 Sb Sa^1/2)^1/2, symmetric
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sb @ root), 0, None)).sum()
    return max(float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * cross), 0.0)


def bootstrap_se(a: np.ndarray, b: np.ndarray, times: int, rng: np.random.Generator) -> float | None:
    if times < 2:
        return None
    draws = [
        frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(times)
    ]
    return float(np.std(draws, ddof=1))


def halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    return order[: n // 2], order[n // 2 :]


def frechet(gen: np.ndarray, real: np.ndarray, bootstrap: int, rng: np.random.Generator) -> dict[str, Any]:
    """The distance on features z-scored by the real set, its bootstrap error, and the floor: the mean
    (and sd) of the distance between two random halves of the real set over ``SPLITS`` halvings."""
    mean, sd = real.mean(axis=0), real.std(axis=0)
    gen, real = (gen - mean) / np.where(sd > 0, sd, 1), (real - mean) / np.where(sd > 0, sd, 1)
    out: dict[str, Any] = dict.fromkeys(("distance", "se", "floor", "floor_sd"))
    if len(gen) >= 2:
        out["distance"], out["se"] = frechet_distance(gen, real), bootstrap_se(gen, real, bootstrap, rng)
    if len(real) >= 4:
        floors = [frechet_distance(real[a], real[b]) for a, b in (halves(len(real), rng) for _ in range(SPLITS))]
        out["floor"], out["floor_sd"] = float(np.mean(floors)), float(np.std(floors, ddof=1))
    return {**out, "bootstrap": bootstrap, "splits": SPLITS}


def classifier_accuracy(a: np.ndarray, b: np.ndarray, folds: int, seed: int, repeats: int = 1) -> dict[str, Any]:
    """Balanced accuracy of a random forest telling the rows of ``a`` from those of ``b``: the mean over
    ``repeats`` stratified k-fold splits, each drawn anew (with a few dozen pieces one split alone moves it by
    up to 0.1); ``sd`` is over all their folds, ``split_sd`` over the splits' means."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score

    k = min(folds, len(a), len(b))
    if k < 2:
        return {"balanced_accuracy": None, "sd": None, "split_sd": None, "folds": k, "repeats": repeats}
    forest = RandomForestClassifier(
        n_estimators=50, min_samples_leaf=2, class_weight="balanced", random_state=seed, n_jobs=1
    )
    x, y = np.vstack([a, b]), np.repeat([0, 1], [len(a), len(b)])
    cv = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    scores = cross_val_score(forest, x, y, cv=cv, scoring="balanced_accuracy")
    per_split = scores.reshape(repeats, k).mean(axis=1)
    return {
        "balanced_accuracy": float(scores.mean()),
        "sd": float(scores.std(ddof=1)),
        "split_sd": float(per_split.std(ddof=1)) if repeats > 1 else None,
        "folds": k,
        "repeats": repeats,
    }


def two_sample(
    gen_rows: list[dict],
    real_rows: list[dict],
    bootstrap: int = 200,
    folds: int = 5,
    seed: int = 0,
    repeats: int = REPEATS,
) -> dict:
    """Summaries of both sets, the Fréchet distance with its floor, and the classifier with its control."""
    gen = np.array([feature_vector(r) for r in gen_rows])
    real = np.array([feature_vector(r) for r in real_rows])
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {
        "feature_vector": list(FEATURE_VECTOR),
        "generated": summary(gen_rows),
        "real": summary(real_rows),
        "separation": separation(gen_rows, real_rows),
        "frechet": frechet(gen, real, bootstrap, rng),
        "classifier": None,
        "classifier_note": None,
    }
    try:
        import sklearn  # noqa: F401
    except ImportError:
        report["classifier_note"] = NO_SKLEARN
        return report
    controls = [
        classifier_accuracy(real[a], real[b], folds, seed, repeats)
        for a, b in (halves(len(real), rng) for _ in range(SPLITS))
    ]
    accuracies = [c["balanced_accuracy"] for c in controls if c["balanced_accuracy"] is not None]
    report["classifier"] = {
        "generated_vs_real": classifier_accuracy(gen, real, folds, seed, repeats),
        "real_vs_real": {
            "balanced_accuracy": float(np.mean(accuracies)) if accuracies else None,
            "sd": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else None,
            "folds": controls[0]["folds"],
            "repeats": repeats,
            "splits": SPLITS,
        },
    }
    return report


def evaluate_against(
    generated: str | Path,
    real: str | Path,
    region: tuple[int, int, int] | None = None,
    prompt: str | Path | None = None,
    bars: int | None = None,
    bootstrap: int = 200,
    folds: int = 5,
    seed: int = 0,
    tok: HIDTokenizer | None = None,
    repeats: int = REPEATS,
) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """The report of two MIDI folders, and the tokens of a few pieces of each (for ``write_report``'s plots).
    ``region``: (track, first bar, last bar), 0-based; ``prompt``: a MIDI file whose key the pieces should keep;
    ``bars``: measure only the first bars of every piece (longer pieces have more bars to repeat)."""
    tok = tok or HIDTokenizer()
    for name, value, least in (
        ("--bars", 1 if bars is None else bars, 1),
        ("--bootstrap", bootstrap, 0),
        ("--folds", folds, 2),
        ("--repeats", repeats, 1),
    ):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    for name, folder in (("--generated", generated), ("--against", real)):
        if not Path(folder).is_dir():
            raise ValueError(f"{name} {folder}: no such folder")
    key = piece_features(tok, tok.encode(prompt))["key"] if prompt else None
    gen_rows, gen_skipped, gen_tokens = read_folder(generated, tok, region, key, bars)
    real_rows, real_skipped, real_tokens = read_folder(real, tok, region, key, bars)
    report = two_sample(gen_rows, real_rows, bootstrap, folds, seed, repeats)
    report["generated"].update(folder=str(generated), skipped=gen_skipped, per_piece=gen_rows)
    report["real"].update(folder=str(real), skipped=real_skipped, per_piece=real_rows)
    region_text = f"{region[0] + 1}:{region[1] + 1}-{region[2] + 1}" if region else None
    report.update(region=region_text, prompt=str(prompt) if prompt else None, prompt_key=key, bars=bars, seed=seed)
    return report, {"generated": gen_tokens, "real": real_tokens}


def _cell(stats: dict, pieces: int) -> str:
    """mean ± sd, with the number of pieces that have a value where some have none."""
    if stats["mean"] is None:
        return "–"
    text = f"{stats['mean']:.3g}" + (f" ± {stats['sd']:.2g}" if stats["sd"] is not None else "")
    return text + (f" (n={stats['n']})" if stats["n"] < pieces else "")


def _pm(value: float | None, se: float | None) -> str:
    return "–" if value is None else f"{value:.3g}" + (f" ± {se:.2g}" if se is not None else "")


def markdown(report: dict) -> str:
    """The report as a Markdown table: mean ± sd (pieces with a value) per feature, then the two-sample tests."""
    gen, real = report["generated"], report["real"]
    apart = report["separation"]
    rows = [
        "| measure | generated | real | AUC |",
        "|---|---:|---:|---:|",
        f"| pieces | {gen['pieces']} | {real['pieces']} | |",
    ]
    for name in SUMMARISED:
        if gen[name]["n"] or real[name]["n"]:
            auc = "–" if apart[name] is None else f"{apart[name]:.2f}"
            rows.append(f"| {name} | {_cell(gen[name], gen['pieces'])} | {_cell(real[name], real['pieces'])} | {auc} |")
    meters = lambda s: ", ".join(f"{m}: {n}" for m, n in s["meters"].items())  # noqa: E731
    rows.append(f"| meters | {meters(gen)} | {meters(real)} | |")
    fd = report["frechet"]
    rows.append(
        f"| Fréchet distance (z-scored features; real: real halves) | {_pm(fd['distance'], fd['se'])} | "
        f"{_pm(fd['floor'], fd['floor_sd'])} | |"
    )
    if report["classifier"]:
        c = report["classifier"]
        g, r = c["generated_vs_real"], c["real_vs_real"]
        rows.append(
            f"| classifier balanced accuracy ({g['folds']}-fold x {g['repeats']}; real: real halves) | "
            f"{_pm(g['balanced_accuracy'], g['sd'])} | {_pm(r['balanced_accuracy'], r['sd'])} | |"
        )
    notes = [
        "Features: mean ± sd over pieces. AUC: the chance that a generated piece's value exceeds a real piece's "
        "(ties half): 0.5 no tendency, near 0 or 1 the feature alone tells the sets apart. Fréchet distance: ± "
        "its bootstrap standard error. Classifier: the mean over random k-fold splits (k-fold x splits), ± the sd "
        "over all their folds. Real column of both: the mean ± sd over "
        f"{SPLITS} random halvings of the real set."
    ]
    if "folder" in gen:
        notes.insert(0, f"Generated: `{gen['folder']}`; real: `{real['folder']}`.")
    if report["classifier_note"]:
        notes.append(report["classifier_note"] + ".")
    if report.get("prompt_key"):
        notes.append(f"key_agrees: share of pieces in the prompt's key, {report['prompt_key']}.")
    if report.get("bars"):
        notes.append(f"Every piece measured on its first {report['bars']} bars.")
    if report.get("region"):
        notes.append(f"Region {report['region']} (track:bars) for the leaps, range and consonance.")
    skipped = len(gen.get("skipped", {})) + len(real.get("skipped", {}))
    if skipped:
        notes.append(f"{skipped} unreadable file(s) skipped; report.json names them.")
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def report_scalars(report: dict) -> dict[str, float]:
    """The report's headline numbers as ``report/<name>`` (for a training logger), those it has."""
    gen, fd, c = report["generated"], report["frechet"], report["classifier"] or {}
    values = {
        "frechet": fd["distance"],
        "frechet_floor": fd["floor"],
        "classifier": c.get("generated_vs_real", {}).get("balanced_accuracy"),
        "classifier_real": c.get("real_vs_real", {}).get("balanced_accuracy"),
        **{name: gen[name]["mean"] for name in ("repetition", "stepwise", "parallels", "crossings", "chord_tone_rate")},
    }
    return {f"report/{k}": float(v) for k, v in values.items() if v is not None}


def strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file beside it, so that it appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(
    report: dict, tokens: dict[str, list[np.ndarray]], out: str | Path, tok: HIDTokenizer | None = None
) -> list[Path]:
    """``report.json``, ``report.md``, ``distributions.png`` and ``self_similarity.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(strict(report), indent=2, allow_nan=False)
    paths = [out / "report.json", out / "report.md", out / "distributions.png", out / "self_similarity.png"]
    write_whole(paths[0], lambda p: p.write_text(text))
    write_whole(paths[1], lambda p: p.write_text(markdown(report)))
    figures = (distributions_figure(report), similarity_figure(report, tokens, tok or HIDTokenizer()))
    for path, figure in zip(paths[2:], figures):
        write_whole(path, lambda p, f=figure: f.savefig(p, format="png", dpi=100))
        plt.close(figure)
    return paths


def distributions_figure(report: dict):
    """One histogram per feature of ``FEATURE_VECTOR`` and the chord-tone rates, both sets overlaid."""
    import matplotlib.pyplot as plt

    names = [*FEATURE_VECTOR, "chord_tone_rate", "chord_tone_rate_shifted"]
    sets = {k: report[k]["per_piece"] for k in ("generated", "real")}
    cols = 4
    figure, axes = plt.subplots(
        math.ceil(len(names) / cols), cols, figsize=(4 * cols, 2.6 * math.ceil(len(names) / cols))
    )
    for ax, name in zip(axes.flat, names):
        values = {k: [r[name] for r in rows if r.get(name) is not None] for k, rows in sets.items()}
        every = values["generated"] + values["real"]
        if every:
            bins = np.histogram_bin_edges(every, bins=12)
            for label, color in (("generated", "tab:orange"), ("real", "tab:blue")):
                if values[label]:
                    ax.hist(values[label], bins=bins, alpha=0.55, density=True, color=color, label=label)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def similarity_figure(report: dict, tokens: dict[str, list[np.ndarray]], tok: HIDTokenizer):
    """The bar self-similarity matrices of the first pieces of each set (a repeated bar: a bright cell)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, MATRICES, figsize=(3.2 * MATRICES, 6.4), squeeze=False)
    for row, label in enumerate(("generated", "real")):
        for col in range(MATRICES):
            ax = axes[row, col]
            if col < len(tokens[label]):
                ax.imshow(self_similarity(tok, tokens[label][col]), vmin=0, vmax=1, cmap="magma", origin="lower")
                ax.set_title(f"{label}: {report[label]['per_piece'][col]['file']}", fontsize=8)
                ax.set_xlabel("bar", fontsize=8)
            else:
                ax.axis("off")
    figure.tight_layout()
    return figure
