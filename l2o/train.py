"""Meta-training: one outer loop for the learned LSTM and for learned hyperparameters.

A *meta-step* is one inner run of ``horizon`` steps on ``meta_batch`` freshly sampled
optimizees (new problem, initialisation and batch order, all derived from
``(seed, meta_step)`` so a resumed run replays exactly). Inside the run the
meta-parameters are updated every ``online`` steps (default: once, at the end; the
LSTM default updates every truncation, as the L2L paper does) with the chosen
estimator from :mod:`l2o.hypergrad`:

* ``truncated`` / ``reverse`` - :func:`l2o.hypergrad.segments` (TRHO when online);
* ``forward`` - :class:`l2o.hypergrad.ForwardUnroll`, tangents carried across updates (RTHO);
* ``implicit`` - :func:`l2o.hypergrad.implicit` at the current weights (Lorraine et al.).

The meta-batch is one "super-optimizee" whose parameters are the union of the
members' (keys ``"b/name"``) and whose loss is their sum: a coordinatewise optimizer
then sees exactly each member's own gradient, and the LSTM processes all
coordinates of all members in one batch.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from . import checkpoint as ckpt_io
from . import hypergrad, optim, tasks
from .config import TrainConfig, UsageError
from .evaluate import rollout, tune_lr, log_grid
from .tasks import BatchStream, seeded

TRAIN_SEEDS = 10_000_000   # training problems: TRAIN_SEEDS + seed * 1e6 + meta_step * 100 + member
VAL_SEEDS = 5_000          # validation (checkpoint selection) seeds; reporting uses others
TUNE_SEEDS = (0, 1, 2, 3, 4)
ADAM_GRID = log_grid(1e-4, 1.0, 9)


def build_optimizer(cfg: TrainConfig, shapes: dict[str, list[int]]) -> optim.DifferentiableOptimizer:
    """The optimizer whose meta-parameters are trained, with only ``cfg.learn`` trainable."""
    if cfg.optimizer == "lstm":
        with torch.random.fork_rng(devices=[]):  # initial weights depend on the run seed only
            torch.manual_seed(cfg.seed)
            return optim.LSTMOptimizer(cfg.lstm_hidden, cfg.lstm_layers, cfg.inputs, cfg.output_scale,
                                        readout=cfg.readout, skip_gain=cfg.skip_gain)
    kw = {k: getattr(cfg, k) for k in ("lr", "momentum", "decay") if getattr(cfg, k) is not None}
    base = optim.make(cfg.optimizer, **kw)
    learn = list(cfg.learn) if cfg.learn is not None else None
    if cfg.weight_decay is not None:
        from .optim.weight_decay import WeightDecay

        opt = WeightDecay(base, cfg.weight_decay, shapes=shapes if cfg.per_parameter else None)
    else:
        opt = base
    opt.learn(learn)
    if not any(p.requires_grad for p in opt.parameters()):
        raise UsageError(f"nothing to learn: --learn {cfg.learn} selects no hyperparameter of {cfg.optimizer}")
    return opt


class MetaTrainer:
    """Owns the task, the optimizer being learned, the outer optimizer and the bookkeeping."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg.validate()
        try:
            self.task = tasks.get(cfg.task, **cfg.task_options())
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        probe = self.task.sample(seeded(0, 0)).init(seeded(0, 0))
        self.shapes = {k: list(v.shape) for k, v in probe.items()}
        try:
            self.opt = build_optimizer(cfg, self.shapes).to(cfg.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.meta_params = {n: p for n, p in self.opt.named_parameters() if p.requires_grad}
        outer_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}[cfg.outer_optimizer]
        self.outer = outer_cls(list(self.meta_params.values()), lr=cfg.outer_lr)
        self.updates_per_step = math.ceil(cfg.horizon / self.update_every)
        total = cfg.meta_steps * self.updates_per_step
        sched = (lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total))) if cfg.lr_schedule == "cosine" \
            else (lambda i: 1.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.outer, sched)
        self.meta_step = 0
        self.best: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {"skipped": 0, "train_seconds": 0.0, "history": []}

    # ------------------------------------------------------------------ schedule of one run
    @property
    def update_every(self) -> int:
        cfg = self.cfg
        if cfg.online is not None:
            return cfg.online
        return cfg.truncation if cfg.optimizer == "lstm" else cfg.horizon

    @property
    def segment_length(self) -> int:
        cfg = self.cfg
        return cfg.truncation if cfg.method == "truncated" else self.update_every

    # ------------------------------------------------------------------ one meta-batch of optimizees
    def _members(self, meta_step: int) -> list[tuple[tasks.Task, dict, BatchStream, int]]:
        out = []
        for b in range(self.cfg.meta_batch):
            s = TRAIN_SEEDS + self.cfg.seed * 1_000_000 + meta_step * 100 + b
            g = seeded(s, 0)
            prob = self.task.sample(g)
            out.append((prob, prob.init(g), BatchStream(prob, "train", seeded(s, 1)), s))
        return out

    def _objective(self, members) -> tuple[Callable, Callable | None, dict, list | None]:
        cfg, B = self.cfg, len(members)
        key = (lambda b, k: f"{b}/{k}") if B > 1 else (lambda b, k: k)
        params = {key(b, k): v for b, (_, p, _, _) in enumerate(members) for k, v in p.items()}
        penalty = getattr(self.opt, "penalty", None)

        def split(p: dict, b: int, prob) -> dict:
            return {k: p[key(b, k)] for k in members[b][1]}

        def inner_loss(p, h, t):
            if t is None:  # implicit: the full objective at the last batch, with the decay penalty
                t = self._last_t
            total = sum(prob.loss(split(p, b, prob), stream[t]) for b, (prob, _, stream, _) in enumerate(members))
            return total + penalty(p) if (penalty is not None and self._with_penalty) else total

        outer_loss = None
        if cfg.objective != "sum_train":
            split_name = "test" if cfg.objective == "final_test" else "train"
            batches = []
            for prob, _, _, s in members:
                g = seeded(s, 3)
                batches.append([prob.batch(split_name, g) for _ in range(4)])

            def outer_loss(p, h):
                return sum(sum(prob.loss(split(p, b, prob), bt) for bt in batches[b]) / len(batches[b])
                           for b, (prob, _, _, _) in enumerate(members)) / B
        weights = [1.0 / B] * cfg.horizon if cfg.objective == "sum_train" else None
        return inner_loss, outer_loss, params, weights

    # ------------------------------------------------------------------ one meta-step
    def meta_step_once(self, log: Callable[[str, float, int], None] | None = None) -> dict[str, float]:
        """Run one inner run with its outer updates; returns figures for logging."""
        cfg = self.cfg
        members = self._members(self.meta_step)
        inner_loss, outer_loss, params, weights = self._objective(members)
        self._with_penalty, self._last_t = False, 0
        hp, state, t, T, U = self.meta_params, None, 0, cfg.horizon, self.update_every
        fu = None
        if cfg.method == "forward":
            fu = hypergrad.ForwardUnroll(inner_loss, params, hp, self.opt, second_order=cfg.second_order,
                                         meta_weights=weights)
        meta_losses, norms, skipped = [], [], 0
        while t < T:
            n = min(U, T - t)
            ol = outer_loss if (outer_loss is not None and (cfg.online is not None or t + n == T)) else None
            if cfg.method in ("truncated", "reverse"):
                grads = {k: torch.zeros_like(v) for k, v in hp.items()}
                ml, finite = 0.0, True
                for seg in hypergrad.segments(inner_loss, ol, params, hp, self.opt, n, self.segment_length,
                                              second_order=cfg.second_order, meta_weights=weights, state=state, start=t):
                    finite = finite and seg.finite
                    for k in grads:
                        grads[k] += seg.grads[k]
                    ml += seg.meta_loss
                params, state = seg.params, seg.state
            elif cfg.method == "forward":
                fu.meta_tangent.zero_()
                fu.meta_loss = 0.0
                fu.run(n)
                grads = fu.hypergrad(ol)
                ml = fu.meta_loss + (float(ol(fu.params, hp)) if ol is not None else 0.0)
                finite = math.isfinite(ml)
            else:  # implicit
                res = hypergrad.unroll(inner_loss, params, hp, self.opt, n, state=state, start=t, graph=False)
                params, state, finite = res.params, res.state, res.finite
                self._with_penalty, self._last_t = True, t + n - 1
                grads = hypergrad.implicit(inner_loss, ol or outer_loss, params, hp, method="neumann",
                                           iters=cfg.implicit_iters) if finite else {}
                self._with_penalty = False
                ml = float((ol or outer_loss)(params, hp)) if finite else math.nan
            t += n
            ok = finite and all(torch.isfinite(g).all() for g in grads.values())
            if not ok:
                skipped += 1
                break
            norms.append(self._apply(grads))
            meta_losses.append(ml)
        self.extra["skipped"] += skipped
        self.meta_step += 1
        return {"meta_loss": sum(meta_losses) if meta_losses else math.nan,
                "grad_norm": max(norms) if norms else math.nan, "skipped": skipped}

    def _apply(self, grads: dict[str, torch.Tensor]) -> float:
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
        for k, p in self.meta_params.items():
            p.grad = grads[k].to(p.dtype)
        if self.cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.meta_params.values()), self.cfg.clip)
        self.outer.step()
        self.sched.step()
        self.opt.project_()
        self.last_grads = grads
        return norm

    # ------------------------------------------------------------------ validation
    def tune_adam(self) -> None:
        """Tune Adam's learning rate on tuning seeds, score it on the validation seeds (once per run)."""
        if "adam_val" in self.extra:
            return
        lr, _ = tune_lr(self.task, lambda lr: optim.Adam(lr=lr), ADAM_GRID, TUNE_SEEDS, self.cfg.horizon)
        self.extra["adam_lr"] = lr
        self.extra["adam_val"] = self._score(optim.Adam(lr=lr))

    def _score(self, opt) -> float:
        seeds = range(VAL_SEEDS, VAL_SEEDS + self.cfg.val_seeds)
        vals = [rollout(self.task, opt, s, self.cfg.horizon).final_loss for s in seeds]
        return sum(vals) / len(vals)

    def validate(self) -> float:
        val = self._score(self.opt)
        self.extra["history"].append([self.meta_step, val])
        if math.isfinite(val) and (self.best is None or val < self.best["val_loss"]):
            self.best = {"val_loss": val, "meta_step": self.meta_step,
                         "state_dict": {k: v.detach().cpu().clone() for k, v in self.opt.state_dict().items()}}
        return val

    def update_magnitudes(self) -> torch.Tensor:
        """|theta_{t+1} - theta_t| of every coordinate over one validation run (for a histogram)."""
        prev: dict = {}
        mags: list[torch.Tensor] = []

        def cb(t, p, loss):
            if prev:
                mags.append(torch.cat([(p[k].detach() - prev[k]).abs().reshape(-1) for k in p]))
            prev.update({k: v.detach().clone() for k, v in p.items()})

        g = seeded(VAL_SEEDS, 0)
        prob = self.task.sample(g)
        stream = BatchStream(prob, "train", seeded(VAL_SEEDS, 1))
        hypergrad.unroll(lambda p, h, t: prob.loss(p, stream[t]), prob.init(g), {}, self.opt, self.cfg.horizon,
                         graph=False, callback=cb)
        return torch.cat(mags) if mags else torch.zeros(1)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"optimizer": ckpt_io.optimizer_payload(self.opt), "best": self.best, "config": self.cfg.to_dict(),
                "outer_optimizer": self.outer.state_dict(), "scheduler": self.sched.state_dict(),
                "meta_step": self.meta_step, "rng": {"torch": torch.get_rng_state()}, "extra": self.extra}

    def save(self, path: str | None = None) -> None:
        ckpt_io.save(path or self.cfg.checkpoint_path, self.state())

    def restore(self, ckpt: dict[str, Any]) -> None:
        old = TrainConfig.from_dict(ckpt["config"])
        diff = self.cfg.differences(old)
        if diff:
            shown = ", ".join(f"{k}={getattr(old, k)!r} (now {getattr(self.cfg, k)!r})" for k in diff[:3])
            raise UsageError(f"--resume: the checkpoint was made with {shown}; rerun with the same flags "
                             f"or start a new run with --name")
        self.opt.load_state_dict(ckpt["optimizer"]["state_dict"])
        self.outer.load_state_dict(ckpt["outer_optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.meta_step, self.best, self.extra = ckpt["meta_step"], ckpt["best"], ckpt["extra"]
        torch.set_rng_state(ckpt["rng"]["torch"])


class AllSkipped(RuntimeError):
    """Every meta-step of a call to :func:`fit` was skipped (non-finite loss or meta-gradient)."""


def _check_outputs(cfg: TrainConfig) -> None:
    """Refuse an output path that cannot be written, before any data is loaded or step run."""
    from .cli import writable_dir, writable_file

    writable_dir(cfg.run_dir, "--log-dir")
    writable_file(cfg.checkpoint_path, "--checkpoint")


def fit(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True,
        tensorboard: bool = True) -> MetaTrainer:
    """Meta-train as configured; checkpoint every ``save_every`` meta-steps and at the end.

    Args:
        cfg: the run's configuration.
        resume: continue from ``cfg.checkpoint_path`` (which must exist and agree with ``cfg``);
            without it an existing checkpoint is never overwritten.
        stop_after: stop (with a checkpoint) after this many (>= 1) meta-steps of this call.

    Raises:
        UsageError: bad configuration or paths (found before any work).
        KeyboardInterrupt: with a message that says what the checkpoint holds, if any.
        AllSkipped: every meta-step of this call had a non-finite loss or meta-gradient.
    """
    import os

    from .logging import RunLogger

    cfg.validate()
    if stop_after is not None and stop_after < 1:
        raise UsageError(f"--stop-after must be a positive integer, got {stop_after}")
    path = cfg.checkpoint_path
    if os.path.isdir(path):
        raise UsageError(f"--checkpoint {path!r} is a folder; give a file path such as runs/NAME/checkpoint.pt")
    if not resume and os.path.exists(path):
        raise UsageError(f"checkpoint {path!r} exists; pass --resume to continue it, or --name / --checkpoint "
                         f"for a new run (nothing was overwritten)")
    if resume and not os.path.exists(path):
        raise UsageError(f"--resume: no checkpoint at {path!r}; start the run without --resume")
    _check_outputs(cfg)
    trainer = MetaTrainer(cfg)
    if resume:
        trainer.restore(ckpt_io.load(path, cfg.device))
    elif cfg.init_from:  # a curriculum stage: start from another run's best weights
        src = ckpt_io.load_optimizer(cfg.init_from, cfg.device)
        if src.config() != trainer.opt.config():
            raise UsageError(f"--init-from {cfg.init_from!r} holds a {src.config()} optimizer, not {trainer.opt.config()}")
        trainer.opt.load_state_dict(src.state_dict())
    if trainer.meta_step >= cfg.meta_steps:
        raise UsageError(f"the checkpoint has already run {trainer.meta_step} of {cfg.meta_steps} meta-steps; "
                         f"raise --meta-steps to train longer")
    log = RunLogger(cfg.run_dir, cfg.to_dict(), trainer.meta_step, cfg.meta_steps,
                    enabled=tensorboard, progress=progress)
    trainer.tune_adam()
    log.postfix["adam"] = f"{trainer.extra['adam_val']:.4g}"
    end = cfg.meta_steps if stop_after is None else min(cfg.meta_steps, trainer.meta_step + stop_after)
    is_lstm = cfg.optimizer == "lstm"
    first, saved = trainer.meta_step, (trainer.meta_step if resume else None)
    skipped_before = trainer.extra["skipped"]
    try:
        while trainer.meta_step < end:
            t0 = time.perf_counter()
            fig = trainer.meta_step_once()
            trainer.extra["train_seconds"] += time.perf_counter() - t0
            step = trainer.meta_step
            log.scalar("meta/loss", fig["meta_loss"], step)
            log.scalar("meta/grad_norm", fig["grad_norm"], step)
            log.scalar("meta/skipped", trainer.extra["skipped"], step)
            log.scalar("meta/outer_lr", trainer.sched.get_last_lr()[0], step)
            if not is_lstm:
                for name, value in trainer.opt.hparams().items():
                    log.scalar(f"hparams/{name}", value, step)
                for name, g in getattr(trainer, "last_grads", {}).items():
                    g = g.detach()
                    log.scalar(f"hypergrad/{name}", float(g.norm()) if g.numel() > 1 else float(g), step)
            postfix = {"loss": fig["meta_loss"]}
            if step % cfg.val_every == 0 or step == cfg.meta_steps:
                val = trainer.validate()
                log.scalar("val/learned", val, step)
                log.scalar("val/adam_tuned", trainer.extra["adam_val"], step)
                if is_lstm:
                    log.histogram("lstm/update_magnitude", torch.log10(trainer.update_magnitudes() + 1e-12), step)
                postfix.update(val=val, best=trainer.best["val_loss"] if trainer.best else None)
            if step % cfg.save_every == 0 or step == end:
                trainer.save()
                saved = step
            log.step(**postfix)
    except KeyboardInterrupt:
        log.close()
        if saved is None:
            held = (f"nothing was saved (the first checkpoint comes after {min(cfg.save_every, end) - first} "
                    f"meta-steps: --save-every); rerun to start again")
        else:
            held = f"the checkpoint {path!r} holds meta-step {saved}: continue with --resume"
        raise KeyboardInterrupt(f"interrupted at meta-step {trainer.meta_step}; {held}") from None
    best = trainer.best["val_loss"] if trainer.best else math.nan
    log.close({"best_val": best, "adam_val": trainer.extra["adam_val"], "skipped": trainer.extra["skipped"]})
    ran, skipped = trainer.meta_step - first, trainer.extra["skipped"] - skipped_before
    if ran > 0 and skipped == ran:
        raise AllSkipped(f"all {ran} meta-steps were skipped (non-finite loss or meta-gradient), the optimizer "
                         f"did not change; check the initial values and --outer-lr (checkpoint {path!r})")
    return trainer
