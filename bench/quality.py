"""The attention ablation: does summary attention learn as well as full attention, and what do the summaries add?

Trains the model of ``configs/ablation.yaml`` three times, changing only ``attention`` (``summary``: the
product; ``causal``: every earlier token of the piece; ``local``: the RR rules alone, no summaries), with the
same data order, seed, steps and shape, then reports on the test split:

- loss and perplexity, overall and per token kind, and by bar index (1-4, 5-8, 9-16, 17-32, 33+);
- the same loss on the single-line and on the multi-track test pieces apart (the reference corpus is 86%
  single-line tunes, where a bar's summary adds little to the fine-bar rules);
- unprompted samples (16 bars) in each texture against the test pieces of that texture: one piano line
  (the tune books' program) against the single-line pieces, choir SATB against the multi-track ones.
  Pitch-class entropy, groove, polyphony, notes per bar, empty-bar rate and Museformer's similarity error,
  with a bootstrap standard error over the samples;
- training steps/s and tokens/s of the three models, measured alternately in one process (a busy machine
  slows them alike).

Arms train in parallel (one thread each), checkpoint every 100 steps and resume where they stopped, so the
script can be rerun after an interruption. Results go to ``--out`` (JSON, PNG plots, ``results.md``).

    python scripts/build_demo_corpus.py --reference --out data/reference-midi   # once (needs music21)
    python bench/quality.py [--steps 400] [--samples 16] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from meloformer.checkpoint import read_checkpoint_metadata
from meloformer.datamodules import HIDDataModule
from meloformer.evaluate import evaluate_music, evaluation_data
from meloformer.hid import PAD, TRACK_PROGRAM0
from meloformer.layout import layout
from meloformer.masks import ATTENTION_VARIANTS
from meloformer.metrics import MusicMetrics, similarity_curve, similarity_error
from meloformer.module import KIND_GROUPS, MeloFormerModule, load_checkpoint
from meloformer.sampler import GenerationRequest, generate

REPO = Path(__file__).resolve().parents[1]
ARMS = ("summary", "causal", "local")
BAR_BUCKETS = ((1, 4), (5, 8), (9, 16), (17, 32), (33, None))
# Sampled instruments (General MIDI programs) per texture: the tune books' piano line, and choir SATB.
TEXTURES = {"single-line": (0,), "multi-track": (52, 52, 53, 53)}
BOOTSTRAP = 500


def arm_config(base: dict, arm: str, steps: int, data_dir: Path, runs: Path) -> Path:
    """The ablation config with ``attention: arm``, its own log and checkpoint folders; written under runs/."""
    config = json.loads(json.dumps(base))
    config["model"]["config"]["attention"] = arm
    config["data"]["data_dir"] = str(data_dir)
    trainer = config["trainer"]
    trainer["max_steps"] = steps
    trainer["default_root_dir"] = str(runs / arm)
    trainer["logger"]["init_args"] = {"save_dir": str(runs), "name": arm, "version": 0}
    (checkpoints,) = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    checkpoints["init_args"]["dirpath"] = str(runs / arm / "checkpoints")
    path = runs / arm / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_arms(configs: dict[str, Path], steps: int) -> None:
    """Train (or resume) every unfinished arm, all at once, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {}
    for arm, config in configs.items():
        last = config.parent / "checkpoints" / "last.ckpt"
        if last.exists() and read_checkpoint_metadata(last)["global_step"] >= steps:
            print(f"{arm}: trained ({steps} steps)")
            continue
        command = [sys.executable, "-m", "meloformer.cli", "fit", "--config", str(config)]
        if last.exists():
            command += ["--ckpt_path", str(last)]
        log = open(config.parent / "fit.log", "a")  # noqa: SIM115 (closed when the process ends)
        running[arm] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"{arm}: training ({'resumed' if last.exists() else 'fresh'}), log {config.parent / 'fit.log'}")
    for arm, process in running.items():
        if process.wait() != 0:
            raise SystemExit(f"{arm}: training failed, see {configs[arm].parent / 'fit.log'}")


def bucket_of(bar: np.ndarray) -> np.ndarray:
    """Bar index (0-based) -> index in BAR_BUCKETS, -1 outside a bar."""
    out = np.full(bar.shape, -1)
    for i, (lo, hi) in enumerate(BAR_BUCKETS):
        out[(bar >= lo - 1) & ((bar <= hi - 1) if hi else True)] = i
    return out


def texture_of(lay) -> np.ndarray:
    """Per token, 1 if its piece has two or more tracks besides the conductor, 0 if one, -1 outside a piece."""
    tracks = np.zeros(lay.doc.shape, dtype=np.int64)
    for row in range(lay.doc.shape[0]):
        docs = lay.doc[row]
        most = np.zeros(docs.max(initial=-1) + 1, dtype=np.int64)
        np.maximum.at(most, docs[docs >= 0], lay.track[row, docs >= 0])
        tracks[row] = np.where(docs >= 0, most[docs.clip(0)], -1)
    return np.where(tracks < 0, -1, (tracks >= 2).astype(np.int64))


@torch.no_grad()
def test_losses(module: MeloFormerModule, data_dir: Path, batch_size: int) -> dict[str, float]:
    """Token-weighted test loss: overall, per kind group, per bar bucket and per texture."""
    data = evaluation_data(module, data_dir, batch_size)
    data.setup("test")
    groups, buckets, textures = len(KIND_GROUPS), len(BAR_BUCKETS), len(TEXTURES)
    size = groups + buckets + textures + 1
    sums, counts = np.zeros(size), np.zeros(size)
    for batch in data.test_dataloader():
        tokens = batch["tokens"]
        loss, valid, group = module.token_losses({"tokens": tokens})
        lay = layout(tokens.numpy(), module.tokenizer.kinds)
        bars, texture = bucket_of(lay.bar[:, 1:]), texture_of(lay)[:, 1:]
        loss, valid, group = loss.numpy(), valid.numpy(), group.numpy()
        sums[-1], counts[-1] = sums[-1] + loss[valid].sum(), counts[-1] + valid.sum()
        for index, offset in ((group, 0), (bars, groups), (texture, groups + buckets)):
            keep = valid & (index >= 0)
            np.add.at(sums, index[keep] + offset, loss[keep])
            np.add.at(counts, index[keep] + offset, 1)
    names = [f"loss_{g}" for g in KIND_GROUPS] + [bucket_name(b) for b in BAR_BUCKETS]
    names += [f"loss_{t}" for t in TEXTURES] + ["loss"]
    out = {name: float(s / c) for name, s, c in zip(names, sums, counts) if c > 0}
    out["ppl"] = float(np.exp(out["loss"]))
    out["test_tokens"] = int(counts[-1])
    for i, t in enumerate(TEXTURES):
        out[f"test_tokens_{t}"] = int(counts[groups + buckets + i])
    return out


def bucket_name(bucket: tuple[int, int | None]) -> str:
    lo, hi = bucket
    return f"loss_bars_{lo}-{hi}" if hi else f"loss_bars_{lo}+"


def write_samples(module: MeloFormerModule, out: Path, programs: tuple[int, ...], count: int, bars: int) -> float:
    """``count`` unprompted samples of ``bars`` bars for ``programs``; returns generated tokens per second."""
    out.mkdir(parents=True, exist_ok=True)
    tok = module.tokenizer
    request = GenerationRequest(bars=bars, instruments=[TRACK_PROGRAM0 + p for p in programs])
    started, tokens = time.perf_counter(), 0
    for k in range(count):
        sample = generate(module.model, tok, request, seed=k, progress=False)
        tok.decode_to_file(sample, out / f"sample_{k}.mid")
        tokens += len(sample)
    return tokens / (time.perf_counter() - started)


def test_midi(midi_dir: Path, data_dir: Path, out: Path) -> dict[str, Path]:
    """Per texture, a folder of links to the test split's source files of that texture (the references of
    the music metrics)."""
    index = json.loads((data_dir / "index.json").read_text())
    folders = {t: out / t for t in TEXTURES}
    for i, piece in enumerate(p for p in index["pieces"] if p["split"] == "test"):
        folder = folders["multi-track" if piece["tracks"] >= 2 else "single-line"]
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"{i:04d}_{Path(piece['source']).name}"
        if not link.exists():
            link.symlink_to((midi_dir / piece["source"]).resolve())
    return folders


def similarity_spread(generated: Path, reference: list[float], seed: int = 0) -> float:
    """Bootstrap standard error of the similarity error over the generated files (resampled with replacement)."""
    metrics = MusicMetrics()
    files = sorted(generated.glob("*.mid"))
    sims = np.stack([metrics.piece(metrics.tok.encode(f))[1] for f in files])  # [files, distance, (sum, count)]
    rng = np.random.default_rng(seed)
    errors = []
    for _ in range(BOOTSTRAP):
        curve = similarity_curve(sims[rng.integers(len(files), size=len(files))].sum(0))
        errors.append(similarity_error(curve, reference))
    return float(np.nanstd(errors))


def throughput(config: dict, data_dir: Path, arms: list[str], steps: int = 5) -> dict[str, dict[str, float]]:
    """Training steps/s and tokens/s of each arm's model, alternating steps in one process, one thread."""
    torch.set_num_threads(1)
    model = config["model"]
    modules = {arm: MeloFormerModule(**{**model, "config": {**model["config"], "attention": arm}}) for arm in arms}
    first = next(iter(modules.values()))
    data = HIDDataModule(
        data_dir=str(data_dir),
        max_seq_len=first.config.max_seq_len,
        max_segments=first.config.summary_slots,
        batch_size=config["data"]["batch_size"],
        tokenizer=first.tokenizer.settings,
    )
    data.setup("test")
    tokens = next(iter(data.test_dataloader()))["tokens"][: config["data"]["batch_size"]]
    optimizers = {arm: torch.optim.AdamW(m.parameters(), lr=1e-4) for arm, m in modules.items()}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(steps + 1):  # the first round warms up
        for arm, module in modules.items():
            started = time.perf_counter()
            loss, valid, _ = module.token_losses({"tokens": tokens})
            (loss.sum() / valid.sum()).backward()
            optimizers[arm].step()
            optimizers[arm].zero_grad()
            times[arm].append(time.perf_counter() - started)
    real = int((tokens != PAD).sum())
    return {
        arm: {"step_s": statistics.median(t[1:]), "tokens_per_s": real / statistics.median(t[1:])}
        for arm, t in times.items()
    }


def learning_curves(runs: Path, arms: list[str]) -> dict[str, dict[str, list]]:
    """Per arm, (step, train loss) and (step, val loss) from the CSV logs."""
    import csv

    curves = {}
    for arm in arms:
        log = runs / arm / "version_0" / "metrics.csv"
        rows = list(csv.DictReader(open(log))) if log.exists() else []  # none before the first logged step
        curve = {"train": [], "val": []}
        for row in rows:
            for key, name in (("train", "train/loss"), ("val", "val/loss")):
                if row.get(name):
                    curve[key].append((int(row["step"]) + 1, float(row[name])))
        curves[arm] = curve
    return curves


def plot(curves: dict, results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, curve in curves.items():
        if len(curve["train"]) < 5:
            continue
        steps, losses = zip(*curve["train"])
        smooth = np.convolve(losses, np.ones(5) / 5, mode="valid")
        line = ax.plot(steps[4:], smooth, alpha=0.5, label=f"{arm} train (5-point mean)")[0]
        if curve["val"]:
            ax.plot(*zip(*curve["val"]), "o-", color=line.get_color(), label=f"{arm} val")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="Learning curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [bucket_name(b) for b in BAR_BUCKETS]
    arms = list(results)
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        values = [results[arm]["test"].get(n, np.nan) for n in names]
        ax.bar(np.arange(len(names)) + i * width, values, width, label=arm)
    ax.set_xticks(np.arange(len(names)) + width, [n[len("loss_bars_") :] for n in names])
    ax.set(xlabel="bar index within the piece", ylabel="test loss", title="Test loss by bar index")
    lows = [results[a]["test"].get(n, np.nan) for a in arms for n in names]
    ax.set_ylim(0.9 * np.nanmin(lows), 1.05 * np.nanmax(lows))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_by_bar.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "ablation.yaml")
    parser.add_argument("--midi", type=Path, default=REPO / "data" / "reference-midi")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "reference-shards")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "ablation")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--bars", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--arms", nargs="+", choices=ATTENTION_VARIANTS, default=list(ARMS))
    args = parser.parse_args()
    base = yaml.safe_load(args.config.read_text())
    if not (args.data / "index.json").exists():
        subprocess.run(
            [sys.executable, "-m", "meloformer.cli", "preprocess", str(args.midi), str(args.data)], check=True
        )
    configs = {arm: arm_config(base, arm, args.steps, args.data, args.runs) for arm in args.arms}
    train_arms(configs, args.steps)

    args.out.mkdir(parents=True, exist_ok=True)
    references = test_midi(args.midi, args.data, args.runs / "test-midi")
    results = {}
    for arm in args.arms:
        module = load_checkpoint(configs[arm].parent / "checkpoints" / "last.ckpt")
        torch.set_num_threads(2)
        results[arm] = {"test": test_losses(module, args.data, batch_size=4), "music": {}}
        for texture, programs in TEXTURES.items():
            samples = args.runs / arm / f"samples-{texture}"
            speed = write_samples(module, samples, programs, args.samples, args.bars)
            music = evaluate_music(samples, references[texture])
            music["similarity_error_se"] = similarity_spread(samples, music["bar_similarity"]["reference"])
            music["generated_tokens_per_s"] = speed
            results[arm]["music"][texture] = music
        print(f"{arm}: test loss {results[arm]['test']['loss']:.4f}")
    speed = throughput(base, args.data, args.arms)
    for arm in args.arms:
        results[arm]["train_speed"] = speed[arm]
    curves = learning_curves(args.runs, args.arms)
    plot(curves, results, args.out)
    report = {
        "steps": args.steps,
        "config": base,
        "results": results,
        "curves": curves,
        "load_average": os.getloadavg(),
        "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]),
    }
    (args.out / "ablation.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))


def table(results: dict) -> str:
    """The Markdown table of the ablation (one column per arm)."""
    arms = list(results)
    rows = ["| | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]

    def row(label: str, values: list[float], fmt: str = "{:.4f}") -> None:
        rows.append(f"| {label} | " + " | ".join(fmt.format(v) for v in values) + " |")

    test = {a: results[a]["test"] for a in arms}
    row("test loss", [test[a]["loss"] for a in arms])
    row("test perplexity", [test[a]["ppl"] for a in arms], "{:.3f}")
    names = [f"loss_{g}" for g in KIND_GROUPS] + [bucket_name(b) for b in BAR_BUCKETS]
    for name in names + [f"loss_{t}" for t in TEXTURES]:
        row(name.replace("loss_", "loss, "), [test[a].get(name, float("nan")) for a in arms])
    for texture in TEXTURES:
        music = {a: results[a]["music"][texture] for a in arms}
        reference = music[arms[0]]["reference"]
        for metric in ("pitch_class_entropy", "groove_consistency", "polyphony", "notes_per_bar", "empty_bar_rate"):
            label = f"{texture} samples: {metric} (test pieces {reference[metric]:.3f})"
            row(label, [music[a]["generated"][metric] for a in arms], "{:.3f}")
        rows.append(
            f"| {texture} samples: similarity error ± bootstrap s.e. (lower is better) | "
            + " | ".join(f"{music[a]['similarity_error']:.4f} ± {music[a]['similarity_error_se']:.4f}" for a in arms)
            + " |"
        )
    row("training steps/s", [1 / results[a]["train_speed"]["step_s"] for a in arms], "{:.3f}")
    row("training tokens/s", [results[a]["train_speed"]["tokens_per_s"] for a in arms], "{:.0f}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
