"""``MeloFormerModule``: the LightningModule that trains MeloFormer on packed HID rows.

It holds the math: next-token loss over the regular tokens of a batch (no loss on padding or on the ``BOS``
that opens the next packed piece; summary slots produce no logits), loss and perplexity per token kind,
throughput, and AdamW with linear warmup then cosine decay over ``trainer.max_steps``. Precision comes from
the Trainer. The architecture (``MeloFormerConfig``) and tokenizer settings travel in every checkpoint, so
``load_checkpoint`` rebuilds the model without the training config, and a resume must match them
(``check_resumable``); the run-time knobs (backend, checkpointing, tile size, compile) may differ.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from meloformer.checkpoint import read_checkpoint, read_checkpoint_metadata
from meloformer.hid import BOS, PAD, HIDError, HIDTokenizer, TokenKind
from meloformer.masks import MaskPlan
from meloformer.model import MASK_FIELDS, SIZES, AttentionContext, MeloFormer, MeloFormerConfig, RuntimeConfig
from meloformer.part_writing import parallel_pitches
from meloformer.row_layout import RowLayout

# Token kinds reported separately; "conductor" is TimeSig/Chord/Tempo and the Pos tokens of the conductor.
KIND_GROUPS = ("bar", "position", "pitch", "duration", "velocity", "track", "conductor")
_GROUP_OF_KIND = {
    TokenKind.BAR: "bar",
    TokenKind.POS: "position",
    TokenKind.PITCH: "pitch",
    TokenKind.DUR: "duration",
    TokenKind.VEL: "velocity",
    TokenKind.TRACK: "track",
    TokenKind.TIMESIG: "conductor",
    TokenKind.CHORD: "conductor",
    TokenKind.TEMPO: "conductor",
}
CONDUCTOR_GROUP = KIND_GROUPS.index("conductor")
POSITION_GROUP = KIND_GROUPS.index("position")


class MeloFormerModule(pl.LightningModule):
    """Train MeloFormer on batches of ``HIDDataModule`` (``{"tokens": LongTensor[B, L], ...}``).

    Args:
        config: the architecture (``MeloFormerConfig``, docs/design.md section 5; or its dict, as checkpoints
            store it); default: the small size (``meloformer sizes``). ``max_seq_len`` is the row length (the
            DataModule packs rows of it), ``summary_slots`` the summary slots per row (rows hold at most this
            many segments). ``vocab_size`` is replaced by the tokenizer's. In a YAML config or on the command
            line (``--model.config.n_embd 128``) every field left out keeps the small size's value, also the
            derived ``ffn_hidden``: a new ``n_embd`` wants its ``ffn_hidden`` given too.
        runtime: how the model runs (``RuntimeConfig``: backend, tile size, gradient checkpointing; or its dict).
        tokenizer: HID tokenizer settings (None: the defaults); the data must have been made with them.
        lr: peak learning rate, reached after ``warmup_steps`` optimizer steps, then cosine decay to
            ``lr * min_lr_ratio`` at ``trainer.max_steps``.
        compile: ``torch.compile`` the model.
        recompile_limit, accumulated_recompile_limit: Dynamo's limits (None: torch's defaults); each phase's
            batch size is one more compiled shape.
        init_from: a model folder (or Hugging Face model id) whose weights the model starts from, to fine-tune
            it (for example the shipped ``models/meloformer-pd-2m`` on your own music); its architecture and
            tokenizer settings must equal ``config``'s and ``tokenizer``'s. A resume takes the checkpoint's
            weights instead.
        parallels_weight: the weight of an unlikelihood term in the training loss (0: none) that lowers the
            probability of pitches that would move in parallel fifths or octaves with an earlier voice
            (``part_writing``), per target token as cross-entropy counts them. Validation and test losses stay
            plain cross-entropy.

    The run-time knobs (``runtime``, compile and the recompile limits) may change on resume.
    """

    def __init__(
        self,
        config: MeloFormerConfig = SIZES["small"],
        runtime: RuntimeConfig = RuntimeConfig(),  # noqa: B008 (the model runs a copy: never changed)
        tokenizer: dict[str, Any] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        recompile_limit: int | None = None,
        accumulated_recompile_limit: int | None = None,
        init_from: str | None = None,
        parallels_weight: float = 0.0,
    ) -> None:  # pragma: no mutate block (mutmut's wrapper would hide these arguments from save_hyperparameters)
        super().__init__()
        try:
            self.tokenizer = HIDTokenizer(**(tokenizer or {}))
        except TypeError as err:
            raise ValueError(f"model: bad tokenizer settings {tokenizer}: {err}") from err
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1 or lr <= 0 or parallels_weight < 0:
            raise ValueError("model: need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and parallels_weight >= 0")
        if isinstance(config, dict):
            config = MeloFormerConfig.from_stored(config)
        if isinstance(runtime, dict):
            runtime = RuntimeConfig(**runtime)
        self.config = dataclasses.replace(config, vocab_size=self.tokenizer.vocab_size)
        self.save_hyperparameters()
        # Plain data, so checkpoints load with weights_only and hparams.yaml reads back; the tokenizer resolved.
        self.hparams.update(
            config=dataclasses.asdict(self.config),
            runtime=dataclasses.asdict(runtime),
            tokenizer=self.tokenizer.settings,
        )
        self.model = MeloFormer(self.config, self.tokenizer.kinds, dataclasses.replace(runtime))
        if init_from is not None:
            self._load_weights_of(init_from)
        self.register_buffer("kind_group", torch.from_numpy(_kind_groups(self.tokenizer)), persistent=False)
        self.metrics = nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in ("val", "test") for name in ("all", *KIND_GROUPS)}
        )
        self._compiled = False
        self._last_step: tuple[float, Tensor] | None = None

    def _load_weights_of(self, folder: str) -> None:
        """Start from the weights of a model folder with this architecture and tokenizer (``init_from``); the
        attention rules (``MASK_FIELDS``) may differ, so a model can be fine-tuned under another mask."""
        from meloformer.pretrained import load_model_folder

        try:
            model, tokenizer = load_model_folder(folder)
        except ValueError as err:  # it names the folder
            raise ValueError(f"model.init_from: {err}") from None
        mask = {name: getattr(self.config, name) for name in MASK_FIELDS}
        try:
            check_same("tokenizer settings", tokenizer.settings, self.tokenizer.settings, "model folder")
            stored, current = (dataclasses.asdict(dataclasses.replace(c, **mask)) for c in (model.config, self.config))
            check_same("model configuration", stored, current, "model folder")
        except ValueError as err:
            raise ValueError(f"model.init_from {folder}: {err}") from None
        self.model.load_state_dict(model.state_dict())

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        if self.hparams.compile and not self._compiled:
            dynamo = torch._dynamo.config
            if self.hparams.recompile_limit is not None:
                dynamo.recompile_limit = self.hparams.recompile_limit
            if self.hparams.accumulated_recompile_limit is not None:
                dynamo.accumulated_recompile_limit = self.hparams.accumulated_recompile_limit
            self.model.compile(dynamic=False)
            self._compiled = True

    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ValueError("set trainer.max_steps: it is the horizon of the learning-rate schedule")
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / (hp.warmup_steps + 1)
            progress = min(1.0, (step - hp.warmup_steps) / max(1, max_steps - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ math
    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def mask_plan(self, backend: str | None = None) -> MaskPlan:
        """What the DataLoader workers add to each batch (``masks.MaskPlan``): side channels and the mask of
        ``backend`` (default: ``attention_backend``, where ``auto`` is flex when CUDA is available, else sdpa)."""
        if backend is None:
            backend = self.model.runtime.attention_backend
            backend = ("flex" if torch.cuda.is_available() else "sdpa") if backend == "auto" else backend
        return self.model.mask_plan(backend)

    def batch_plan(self) -> MaskPlan | WithParallelPitches:
        """What the DataLoader workers add to each training batch: ``mask_plan``, and with ``parallels_weight``
        the pitches each token must not take (``batch["parallel_pitches"]``)."""
        plan = self.mask_plan()
        return WithParallelPitches(plan, self.tokenizer) if self.hparams.parallels_weight > 0 else plan

    def attention_context(self, batch: dict[str, Any], backend: str | None = None) -> AttentionContext:
        """The exact attention context a step runs for a loader batch: the batch's own side channels and
        mask when the loader built them (``mask_plan``) for this backend (default: the batch's, else the
        model's choice), so the step then only wraps them."""
        tokens = batch["tokens"]
        layout = batch.get("layout")
        rows = None if layout is None else RowLayout.from_tensors(layout, tokens.shape[1])
        return self.model.prepare(tokens, backend, rows, batch.get("mask"))

    def token_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-target loss ``[B, L-1]``, which targets count, and each target's kind group (-1: none)."""
        loss, valid, group, _ = self._forward_losses(batch)
        return loss, valid, group

    def _forward_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``token_losses`` and the logits ``[B, L, vocab]``."""
        tokens = batch["tokens"]
        ctx = self.attention_context(batch)  # layout and mask, outside the compiled forward
        logits = self.model(tokens, ctx=ctx)
        loss, valid = next_token_losses(logits, tokens)
        group = self.kind_group[tokens[:, 1:]]
        in_conductor = ctx.rows.track[:, 1 : tokens.shape[1]] == 0
        group = torch.where((group == POSITION_GROUP) & in_conductor, CONDUCTOR_GROUP, group)
        return loss, valid, group, logits

    @staticmethod
    def group_means(loss: Tensor, valid: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean loss over valid targets, and per kind group the loss sums and target counts."""
        n = len(KIND_GROUPS)
        index = torch.where(valid & (group >= 0), group, n).flatten()
        sums = torch.zeros(n + 1, device=loss.device, dtype=loss.dtype).index_add_(0, index, loss.flatten())
        counts = torch.zeros(n + 1, device=loss.device, dtype=loss.dtype).index_add_(
            0, index, torch.ones_like(loss.flatten())
        )
        mean = loss.sum() / valid.sum().clamp(min=1)
        return mean, sums[:n], counts[:n]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One step with no host sync: every logged value stays a device tensor (a kind group that no target
        of the batch has logs NaN)."""
        tokens = batch["tokens"]
        loss, valid, group, logits = self._forward_losses(batch)
        mean, sums, counts = self.group_means(loss, valid, group)
        size = tokens.shape[0]
        total = mean
        if self.hparams.parallels_weight > 0:
            forbidden = batch.get("parallel_pitches")
            if forbidden is None:  # a batch from a loader without the plan (batch_plan)
                forbidden = torch.from_numpy(parallel_pitches(self.tokenizer, tokens.cpu().numpy()))
            unlikely = parallels_unlikelihood(logits, forbidden.to(logits.device), self.tokenizer.pitch0)
            parallels = unlikely.sum() / valid.sum().clamp(min=1)
            self.log("train/parallels", parallels.detach(), batch_size=size)
            total = mean + self.hparams.parallels_weight * parallels
        self.log("train/loss", mean, prog_bar=True, batch_size=size)
        self.log("train/ppl", torch.exp(mean.detach()), batch_size=size)
        per_kind = sums.detach() / counts  # 0 / 0 = NaN where the batch has no target of a group
        self.log_dict({f"train/loss_{name}": per_kind[i] for i, name in enumerate(KIND_GROUPS)}, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        self._log_throughput((tokens != PAD).sum(), size)
        return total

    def _log_throughput(self, tokens: Tensor, size: int) -> None:
        """Non-padding tokens per second of this process, over the previous step (loading included); the
        token count stays on the device."""
        now = time.perf_counter()
        if self._last_step is not None:
            started, previous_tokens = self._last_step
            self.log("train/tokens_per_s", previous_tokens / max(now - started, 1e-9), batch_size=size)
        self._last_step = (now, tokens)

    def on_train_epoch_start(self) -> None:
        self._last_step = None  # the gap between epochs (a new loader, validation) is not throughput

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        loss, valid, group = self.token_losses(batch)
        mean, sums, counts = self.group_means(loss, valid, group)
        # Every metric is updated (possibly with weight 0), so all ranks compute the same metrics.
        self.metrics[f"{stage}_all"].update(mean, valid.sum())
        for i, name in enumerate(KIND_GROUPS):
            self.metrics[f"{stage}_{name}"].update(sums[i] / counts[i].clamp(min=1), counts[i])

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        """Token-weighted loss and perplexity over the whole evaluation, overall and per kind group."""
        for name in ("all", *KIND_GROUPS):
            metric = self.metrics[f"{stage}_{name}"]
            if not metric.update_called:
                continue
            value = metric.compute()  # synchronised across ranks by torchmetrics
            metric.reset()
            if not torch.isfinite(value):  # no target of this kind anywhere
                continue
            suffix = "" if name == "all" else f"_{name}"
            self.log(f"{stage}/loss{suffix}", value, prog_bar=name == "all", sync_dist=True)
            self.log(f"{stage}/ppl{suffix}", torch.exp(value), sync_dist=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["meloformer"] = {
            "model_config": dataclasses.asdict(self.config),
            "tokenizer": self.tokenizer.settings,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("meloformer")
        if saved is None:
            raise ValueError("not a MeloFormer checkpoint (no 'meloformer' entry)")
        self.check_resumable(saved)

    def check_resumable(self, saved: dict[str, Any]) -> None:
        """Raise ValueError unless a checkpoint's ``meloformer`` entry has this module's architecture and
        tokenizer settings (the one resume check: the CLI runs it before training, Lightning on restore)."""
        check_same("tokenizer settings", saved["tokenizer"], self.tokenizer.settings)
        stored = dataclasses.asdict(MeloFormerConfig.from_stored(saved["model_config"]))
        check_same("model configuration", stored, dataclasses.asdict(self.config))


def next_token_losses(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy ``[B, L-1]`` of ``logits`` ``[B, L, vocab]`` on ``tokens`` ``[B, L]``, and which
    targets count: no loss on padding or on the ``BOS`` that opens the next packed piece."""
    targets = tokens[:, 1:]
    valid = (targets != PAD) & (targets != BOS)
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets.masked_fill(~valid, -100), reduction="none")
    return loss, valid


def parallels_unlikelihood(logits: Tensor, forbidden: Tensor, pitch0: int) -> Tensor:
    """``-log(1 - p)`` per target ``[B, L-1]``, where p is the probability ``logits`` ``[B, L, vocab]`` give the
    pitches ``forbidden`` ``[B, L, 128]`` marks at the next token (0 where it marks none): an unlikelihood
    term (Welleck et al., 2020) computed densely, so the step needs no host sync."""
    pitch = logits[:, :-1].float().log_softmax(-1)[..., pitch0 : pitch0 + 128].exp()
    mass = (pitch * forbidden[:, 1:]).sum(-1)
    return -torch.log1p(-mass.clamp(max=1 - 1e-6))


@dataclasses.dataclass(frozen=True)
class WithParallelPitches:
    """A batch plan (``MeloFormerModule.batch_plan``): ``plan``'s side channels and mask, and per token the
    pitches that would move in parallel fifths or octaves (``batch["parallel_pitches"]``, ``part_writing``)."""

    plan: MaskPlan
    tokenizer: HIDTokenizer

    @property
    def doc_align(self) -> int:
        return self.plan.doc_align

    def __call__(self, tokens: Tensor) -> dict[str, Any]:
        forbidden = parallel_pitches(self.tokenizer, tokens.numpy())
        return self.plan(tokens) | {"parallel_pitches": torch.from_numpy(forbidden)}


def check_same(what: str, saved: dict[str, Any], current: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise ValueError naming every field where the ``source`` (a checkpoint) and the current run differ."""
    differing = [k for k in sorted(set(saved) | set(current)) if _plain(saved.get(k)) != _plain(current.get(k))]
    if differing:
        detail = ", ".join(f"{k}: {source} {saved.get(k)!r} vs now {current.get(k)!r}" for k in differing)
        raise ValueError(f"the {source} was made with other {what} ({detail})")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _kind_groups(tokenizer: HIDTokenizer) -> np.ndarray:
    """Token id -> index in KIND_GROUPS (-1 for PAD, BOS, EOS)."""
    table = np.full(len(TokenKind), -1, dtype=np.int64)
    for kind, name in _GROUP_OF_KIND.items():
        table[kind] = KIND_GROUPS.index(name)
    return table[tokenizer.kinds]


def model_card(module: MeloFormerModule, ckpt_path: str | Path) -> str:
    """A plain model card for ``meloformer export``: what the model is and how to use it."""
    step = read_checkpoint_metadata(ckpt_path).get("global_step", "?")
    c = module.config
    return (
        f"# MeloFormer model\n\nExported from `{Path(ckpt_path).name}` after {step} optimizer steps.\n\n"
        f"- {module.model.num_parameters():,} parameters: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads "
        f"({c.n_kv_head} key/value), `{c.attention}` attention, rows of {c.max_seq_len} tokens\n"
        f"- HID tokenizer settings: `{module.tokenizer.settings}`\n\n"
        "```bash\nmeloformer generate --ckpt_path THIS_FOLDER --out samples\n```\n"
    )


def module_of(config: dict[str, Any], tokenizer: dict[str, Any], **training: Any) -> MeloFormerModule:
    """A module whose model has exactly ``config`` (every ``MeloFormerConfig`` field, as checkpoints and model
    folders store it; ``vocab_size`` is the tokenizer's, and the weights check it)."""
    return MeloFormerModule(MeloFormerConfig.from_stored(config), tokenizer=tokenizer, **training)


def module_from_folder(folder: str | Path) -> MeloFormerModule:
    """A module (for evaluation) around the model and tokenizer of a model folder."""
    from meloformer.pretrained import load_model_folder

    model, tokenizer = load_model_folder(folder)
    module = module_of(dataclasses.asdict(model.config), tokenizer.settings)
    module.model.load_state_dict(model.state_dict())
    return module.eval()


# The training hyperparameters: every argument of MeloFormerModule but the model's, the tokenizer's and the
# starting weights (a checkpoint holds its own; the folder they came from need not exist any more).
TRAINING_ARGS = tuple(
    name
    for name in inspect.signature(MeloFormerModule).parameters
    if name not in ("config", "runtime", "tokenizer", "init_from")
)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> MeloFormerModule:
    """Rebuild a trained module (model, tokenizer, hyperparameters) from a checkpoint alone (checked first:
    a damaged or foreign file is a ``CheckpointError``). The architecture comes from what the checkpoint
    stores, the run-time knobs start at their defaults; older checkpoints, with the model fields (or
    ``overrides``) among their hyperparameters, load too."""
    checkpoint = read_checkpoint(path, map_location=map_location)
    saved = checkpoint["meloformer"]
    training = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in TRAINING_ARGS}
    module = module_of(saved["model_config"], saved["tokenizer"], **training)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when this machine has it, else ``cpu``; any other name as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def open_checkpoint(path: str | None, device: str) -> MeloFormerModule:
    """The trained module of a checkpoint, model folder or Hugging Face model id (``None``: the shipped model) on
    ``device`` (``resolve_device``); ValueError with one line for a missing, foreign or damaged file or a device
    this machine lacks."""
    from meloformer.pretrained import default_model_folder, is_hub_id, is_model_folder

    device = resolve_device(device)
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if where.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")
    path = str(default_model_folder()) if path is None else path
    if is_model_folder(path) or is_hub_id(path):
        return module_from_folder(path).to(where)
    if not Path(path).is_file():
        raise ValueError(f"--ckpt_path {path}: no such file or model folder")
    try:
        return load_checkpoint(path, map_location=where)
    except HIDError as err:  # tokenizer settings this version cannot read (an older HID format)
        raise ValueError(f"--ckpt_path {path}: {err}") from None
    except ValueError:
        raise
    except Exception as err:  # a foreign or damaged file fails anywhere in torch.load/pickle: name it, no traceback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--ckpt_path {path}: not a readable MeloFormer checkpoint ({reason})") from None
