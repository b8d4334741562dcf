"""Meta-training: one outer loop for the learned LSTM and for learned hyperparameters.

A *meta-step* is one inner run of ``horizon`` steps on ``meta_batch`` freshly sampled
optimizees (new problem, initialisation and batch order, all derived from
``(seed, meta_step)`` so a resumed run replays exactly). The run is handed to an
estimator from :mod:`l2o.hypergrad` (``--method``: truncated, reverse, forward,
implicit, pes, es), which returns a meta-gradient every ``update_every`` inner steps:

    estimate (per member; --member-balance: scaled to unit norm) -> mean over the meta-batch (gathered
    from all ranks) -> clip -> outer step
    -> log -> checkpoint

``update_every`` is ``--online`` if given, else what the optimizer asks for
(``opt.default_update_every``: once per run for a few hyperparameters, every
truncation for the LSTM). The trainer never asks which estimator or optimizer it holds.
Checkpoints fall between meta-steps, where no run is in flight: a run's estimator state
(position, particles, PES accumulators, the perturbation stream) is rebuilt from
``(seed, meta_step)``, so a resumed run is bit-exact; ``Estimator.state_dict`` carries
that state for an outer loop that stops inside a run.

Each member of the meta-batch is its own inner run, and the members' meta-gradients are
averaged in float64 in member order, so a member's contribution has the same bits whichever
process computes it and the learned weights do not depend on the number of processes
(:meth:`MetaTrainer.problem` can still merge members into one "super-optimizee" whose
parameters are the union of theirs, keys ``"b/name"``, and whose loss is their sum).
Members may be different tasks of a family (different sizes).
Objectives: ``sum_train`` (sum over steps of the members' mean loss), ``final_train`` /
``final_test`` (mean loss at the end of each update chunk), ``normalised`` (mean over
steps and members of ``log(loss_t / loss_0)``: scale-free, so no task of a family dominates).
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable

import torch

from . import checkpoint as ckpt_io
from . import distributed, hypergrad, optim, schedule, tasks, validation
from .config import TrainConfig, UsageError
from .evaluate import rollout, tune_lr, log_grid
from .tasks import BatchStream, seeded

TRAIN_SEEDS = 10_000_000   # training problems: TRAIN_SEEDS + seed * 1e6 + meta_step * 100 + member
VAL_SEEDS = 5_000          # validation (checkpoint selection) seeds; reporting uses others
TUNE_SEEDS = (0, 1, 2, 3, 4)
ADAM_GRID = log_grid(1e-4, 1.0, 9)
# configuration fields -> optimizer constructor arguments (each optimizer takes those it has)
OPTIMIZER_OPTIONS = {"lstm_hidden": "hidden", "lstm_layers": "layers", "inputs": "inputs", "output_scale": "output_scale",
                     "readout": "readout", "skip_gain": "skip_gain", "lr": "lr", "momentum": "momentum", "decay": "decay"}
# configuration fields -> estimator options (each estimator takes those its options class has)
ESTIMATOR_OPTIONS = {"truncation": "truncate", "implicit_iters": "iters", "population": "particles", "sigma": "sigma"}


def build_optimizer(cfg: TrainConfig, shapes: dict[str, list[int]]) -> optim.DifferentiableOptimizer:
    """The optimizer whose meta-parameters are trained, with only ``cfg.learn`` trainable."""
    cls = optim.NAMES[cfg.optimizer][0]
    accepted = inspect.signature(cls.__init__).parameters
    kw = {arg: getattr(cfg, key) for key, arg in OPTIMIZER_OPTIONS.items()
          if arg in accepted and getattr(cfg, key) is not None}
    with torch.random.fork_rng(devices=[]):  # initial weights depend on the run seed only
        torch.manual_seed(cfg.seed)
        base = optim.make(cfg.optimizer, **kw)
    if cfg.weight_decay is not None:
        from .optim.weight_decay import WeightDecay

        opt = WeightDecay(base, cfg.weight_decay, shapes=shapes if cfg.per_parameter else None)
    else:
        opt = base
    if cfg.adaptive_scale is not None:
        opt = optim.AdaptiveScale(opt, cfg.adaptive_scale, init_log_scale=cfg.adaptive_scale_init,
                                  shrink=cfg.adaptive_scale_shrink)
    plus = cfg.plus_part()
    if plus is not None:
        part = optim.make(plus[0], lr=plus[1])
        if cfg.adaptive_scale is not None:  # its own adapted scale, starting at its own learning rate
            part = optim.AdaptiveScale(part, cfg.adaptive_scale, shrink=cfg.adaptive_scale_shrink,
                                       min_log_scale=cfg.plus_floor)
        opt = optim.Sum([opt, part])
    opt.learn(list(cfg.learn) if cfg.learn is not None else None)
    if not any(p.requires_grad for p in opt.parameters()):
        raise UsageError(f"nothing to learn: --learn {cfg.learn} selects no hyperparameter of {cfg.optimizer}")
    return opt


def build_estimator(cfg: TrainConfig, update_every: int, truncation: int | None = None) -> hypergrad.Estimator:
    """The ``--method`` estimator with the options its own options class declares (``truncation``: a phase's)."""
    cls = hypergrad.ESTIMATORS[cfg.method]
    names = {f for f in cls.options_class.__dataclass_fields__}
    kw = {opt: getattr(cfg, key) for key, opt in ESTIMATOR_OPTIONS.items() if opt in names}
    if truncation is not None and "truncate" in names:
        kw["truncate"] = truncation
    return hypergrad.make(cfg.method, every=update_every, **kw)


def build_task(cfg: TrainConfig) -> tasks.Task:
    """The task, or the family when ``cfg.family`` is given."""
    if cfg.family is not None:
        return tasks.family(cfg.family, data_dir=cfg.data_dir, device=cfg.device)
    return tasks.get(cfg.task, **cfg.task_options())


class MetaTrainer:
    """Owns the task, the optimizer being learned, the estimator, the outer optimizer and the bookkeeping."""

    dist: distributed.Context = distributed.LOCAL  # [distributed] fit() sets this rank's place under torchrun

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg.validate()
        try:
            self.task = build_task(cfg)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        self.is_family = isinstance(self.task, tasks.Family)
        probe = self.task.sample(seeded(0, 0)).init(seeded(0, 0))
        self.shapes = {k: list(v.shape) for k, v in probe.items()}
        try:
            self.opt = build_optimizer(cfg, self.shapes).to(cfg.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.meta_params = {n: p for n, p in self.opt.named_parameters() if p.requires_grad}
        self.phases = cfg.phases()  # one phase without --schedule
        self._build_phase(0)
        self._check_estimator()
        self.meta_step = 0
        self.best: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {"skipped": 0, "train_seconds": 0.0, "history": []}
        self.val_groups: dict[str, float] = {}
        self.val_loss_ratios: dict[str, float] = {}

    def _build_phase(self, k: int) -> None:
        """Phase ``k``'s truncation, estimator, fresh outer optimizer and its learning-rate decay over the phase."""
        cfg, ph = self.cfg, self.phases[k]
        self.phase, self.truncation = k, ph.truncation
        self.update_every = cfg.online or self.opt.default_update_every(ph.truncation, cfg.horizon)
        self.estimator = build_estimator(cfg, self.update_every, ph.truncation if cfg.schedule else None)
        outer_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}[cfg.outer_optimizer]
        self.outer = outer_cls(list(self.meta_params.values()), lr=ph.outer_lr or cfg.outer_lr)
        self.updates_per_step = math.ceil(cfg.horizon / self.update_every)
        total = ph.meta_steps * self.updates_per_step
        sched = (lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total))) if cfg.lr_schedule == "cosine" \
            else (lambda i: 1.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.outer, sched)

    def _enter_phase(self) -> None:
        """At a phase's first meta-step: continue from the best-validated weights so far, with phase settings."""
        k = schedule.phase_at(self.phases, self.meta_step)
        if k == self.phase:
            return
        if self.best is not None:  # validated at the end of the previous phase, so this includes it
            self.opt.load_state_dict({k_: v.to(self.cfg.device) for k_, v in self.best["state_dict"].items()})
        self._build_phase(k)

    def phase_ends(self, meta_step: int) -> bool:
        """Whether ``meta_step`` (steps done) closes a phase of a schedule (validated, to pick the next start)."""
        return self.cfg.schedule is not None and any(ph.end == meta_step for ph in self.phases)

    def _check_estimator(self) -> None:
        """Refuse, in one line naming the methods that can, an estimator that cannot learn these meta-parameters."""
        problem = self.problem(self._members(0))
        try:
            self.estimator.check(problem, self.meta_params)
        except ValueError as exc:
            able = []
            for name, cls in hypergrad.ESTIMATORS.items():
                try:
                    cls().check(problem, self.meta_params)
                    able.append(name)
                except ValueError:
                    pass
            raise UsageError(f"--method {self.cfg.method} cannot learn the meta-parameters of {self.cfg.optimizer} "
                             f"({str(exc).rstrip('.')}); methods that can: {', '.join(able) or 'none'}") from None

    # ------------------------------------------------------------------ one meta-batch of optimizees
    def member_seeds(self, meta_step: int) -> list[int]:
        """The seeds of this meta-step's optimizees; [distributed] this rank's share, by global member index."""
        return [self._member_seed(meta_step, b) for b in self.dist.shard(self.cfg.meta_batch)]

    def _member_seed(self, meta_step: int, b: int) -> int:
        """The seed of global member ``b`` of ``meta_step`` (its problem, initialisation and batches)."""
        return TRAIN_SEEDS + self.cfg.seed * 1_000_000 + meta_step * 100 + b

    def _members(self, meta_step: int) -> list[tuple[tasks.Task, dict, BatchStream, int]]:
        out = []
        keep = max(4, self.truncation)  # PES / ES particles replay a truncation's batches one after another
        for s in self.member_seeds(meta_step):
            g = seeded(s, 0)
            prob = self.task.sample(g)
            out.append((prob, prob.init(g), BatchStream(prob, "train", seeded(s, 1), keep=keep), s))
        return out

    def problem(self, members) -> hypergrad.Problem:
        """The meta-batch as one inner run: the super-optimizee's loss, the objective, the initial parameters."""
        cfg, B = self.cfg, len(members)
        key = (lambda b, k: f"{b}/{k}") if B > 1 else (lambda b, k: k)
        params = {key(b, k): v for b, (_, p, _, _) in enumerate(members) for k, v in p.items()}
        normalised = cfg.objective == "normalised"
        if normalised:  # each member's initial loss, a constant: log(loss_t / loss_0) is scale-free
            with torch.no_grad():
                loss0 = [float(prob.loss(p, stream[0])) for prob, p, stream, _ in members]

        def split(p: dict, b: int) -> dict:
            return {k: p[key(b, k)] for k in members[b][1]}

        def inner_loss(p, h, t):
            losses = [prob.loss(split(p, b), stream[t]) for b, (prob, _, stream, _) in enumerate(members)]
            total = sum(losses)
            if not normalised:
                return total
            term = sum(torch.log(torch.clamp(l / l0, min=1e-30)) for l, l0 in zip(losses, loss0)) / B
            return total, term

        outer_loss = None
        if cfg.objective in ("final_train", "final_test"):
            split_name = "test" if cfg.objective == "final_test" else "train"
            batches = []
            for prob, _, _, s in members:
                g = seeded(s, 3)
                batches.append([prob.batch(split_name, g) for _ in range(4)])

            def outer_loss(p, h):
                return sum(sum(prob.loss(split(p, b), bt) for bt in batches[b]) / len(batches[b])
                           for b, (prob, _, _, _) in enumerate(members)) / B
        weights = {"sum_train": [1.0 / B] * cfg.horizon, "normalised": [1.0 / cfg.horizon] * cfg.horizon}.get(cfg.objective)
        return hypergrad.Problem(inner_loss, outer_loss, params, self.opt, cfg.horizon, weights, cfg.second_order)

    # ------------------------------------------------------------------ one meta-step
    def meta_step_once(self, log: Callable[[str, float, int], None] | None = None) -> dict[str, float]:
        """Run one inner run per member with their outer updates; returns figures for logging."""
        self._enter_phase()
        est, seed = self.estimator, TRAIN_SEEDS + self.cfg.seed * 1_000_000 + self.meta_step * 100
        # one run per member (each with the same perturbation stream, PES / ES): a member's meta-gradient
        # is then computed alike in one process and under torchrun, whatever else shares its process
        runs = [est.init(self.problem([m]), self.meta_params, seeded(seed, 4)) for m in self._members(self.meta_step)]
        meta_losses, norms, skipped, member_norms = [], [], 0, []
        while not est.done(runs[0]):
            rows = []
            for i, state in enumerate(runs):
                grads, metrics, runs[i] = est.estimate(self.meta_params, state)
                ok = bool(metrics["finite"]) and all(bool(torch.isfinite(g).all()) for g in grads.values())
                norm = math.sqrt(sum(float((g.detach().double() ** 2).sum()) for g in grads.values())) if ok else 0.0
                if self.cfg.member_balance and ok and norm > 0:  # each member's meta-gradient to unit length
                    grads = {k: g.detach().double() / norm for k, g in grads.items()}
                rows.append((grads, metrics["meta_loss"], ok, norm))
            # [distributed] every update goes through _apply, non-finite ones included, so that all
            # ranks meet in the same collective and take the same decision
            grads, ml, ok, row_norms = self._combine(rows)
            ok, ml, norm = self._apply(grads, ml, ok)
            if not ok:
                skipped += 1
                break
            norms.append(norm)
            meta_losses.append(ml)
            member_norms.append(row_norms)
        self.extra["skipped"] += skipped
        fig = {"meta_loss": sum(meta_losses) if meta_losses else math.nan,
               "grad_norm": max(norms) if norms else math.nan, "skipped": skipped,
               "member_grad_norms": self._by_component(member_norms)}
        self.meta_step += 1
        return fig

    def _by_component(self, member_norms: list[list[float]]) -> dict[str, float]:
        """Each family component's mean pre-balancing meta-gradient norm over this meta-step's updates and members."""
        if not self.is_family or not member_norms:
            return {}
        names = [validation.component(self.task, self._member_seed(self.meta_step, b))
                 for b in range(self.cfg.meta_batch)]  # the global members, in order
        out: dict[str, list[float]] = {}
        for row in member_norms:
            for name, n in zip(names, row):
                out.setdefault(name, []).append(n)
        return {k: sum(v) / len(v) for k, v in sorted(out.items())}

    def _apply(self, grads: dict[str, torch.Tensor], meta_loss: float = 0.0, ok: bool = True
               ) -> tuple[bool, float, float]:
        """Clip and take the outer step with the meta-batch's mean meta-gradient.

        Returns ``(stepped, meta_loss, pre-clipping norm)``; nothing changes when ``ok`` is False.
        """
        if not ok:
            return False, meta_loss, math.nan
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
        for k, p in self.meta_params.items():
            p.grad = grads[k].to(p.dtype)
        if self.cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.meta_params.values()), self.cfg.clip)
        self.outer.step()
        self.sched.step()
        self.opt.project_()
        self.last_grads = grads
        return True, meta_loss, norm

    def _combine(self, rows: list[tuple[dict[str, torch.Tensor], float, bool, float]]
                 ) -> tuple[dict[str, torch.Tensor], float, bool, list[float]]:
        """The meta-batch's mean of the members' ``(grads, meta_loss, finite, norm)``; one collective under torchrun.

        Each member becomes one float64 row ``[grads..., meta_loss, non-finite flag, norm]`` (zeros
        with the flag set if it is not finite); [distributed] the rows of all ranks are gathered
        in member order, so every rank, and one process holding the whole meta-batch, adds the
        same rows in the same order and divides by the meta-batch: the same bits for any number
        of processes. A non-finite member anywhere makes every rank skip the update. Returns the
        mean gradient, mean meta-loss, whether all were finite, and every member's ``norm`` (global order).
        """
        hp = self.meta_params
        device = next(iter(hp.values())).device
        table = torch.stack([torch.cat(
            [(g[k] if ok else torch.zeros_like(p)).detach().reshape(-1).double().to(device) for k, p in hp.items()]
            + [torch.tensor([ml if ok else 0.0, 0.0 if ok else 1.0, norm], dtype=torch.float64, device=device)])
            for g, ml, ok, norm in rows])
        table = self.dist.all_gather(table)  # [meta_batch, n + 3], global member order
        total = table[0].clone()
        for row in table[1:]:  # one fixed order of additions (a reduction kernel may pick its own)
            total += row
        total /= table.shape[0]
        out, i = {}, 0
        for k, p in hp.items():
            out[k] = total[i:i + p.numel()].view_as(p).to(p.dtype)
            i += p.numel()
        return out, float(total[-3]), float(total[-2]) == 0.0, [float(x) for x in table[:, -1]]

    # ------------------------------------------------------------------ validation
    def _score(self, opt, seeds=None) -> float:
        """Mean final loss of a plain task's validation (or ``seeds``) runs."""
        seeds = list(seeds if seeds is not None else range(VAL_SEEDS, VAL_SEEDS + self.cfg.val_seeds))
        vals = self.dist.map(lambda s: rollout(self.task, opt, s, self.cfg.horizon).final_loss, seeds)
        return sum(vals) / len(vals)  # [distributed] rollouts spread over the ranks, summed in seed order

    def tune_adam(self) -> None:
        """Tune Adam once per run (kept in the checkpoint, so ``--resume`` does not re-tune).

        A task: one learning rate on the tuning seeds, scored on the validation seeds. A family:
        one rate per validation member, tuned on that member (:mod:`l2o.validation`); the
        family's validation is then relative to those runs, so tuned Adam scores 0.
        """
        if self.is_family:
            if "adam_members" in self.extra:
                return
            seeds = range(VAL_SEEDS, VAL_SEEDS + self.cfg.val_seeds)
            tuned = {str(h): validation.tune_members(self.task, seeds, h, ADAM_GRID, map_fn=self.dist.map)
                     for h in self.val_horizons}  # [distributed] spread
            # one horizon: {seed: Adam's run}, as before --val-horizons; several: {horizon: {seed: ...}}
            self.extra["adam_members"] = tuned if self.cfg.val_horizons else tuned[str(self.cfg.horizon)]
            self.extra["adam_lr"], self.extra["adam_val"] = math.nan, 0.0
            if self.best is not None:  # a run from before per-member validation: rescore its best alike
                import copy

                best = copy.deepcopy(self.opt)
                best.load_state_dict(self.best["state_dict"])
                self.best["val_loss"] = validation.balanced_mean(self._family_scores(best)[0])[0]
            return
        if "adam_val" in self.extra:
            return
        lr, _ = tune_lr(self.task, lambda lr: optim.Adam(lr=lr), ADAM_GRID, TUNE_SEEDS, self.cfg.horizon,
                        map_fn=self.dist.map)  # [distributed] rollouts spread over the ranks
        self.extra["adam_lr"] = lr
        self.extra["adam_val"] = self._score(optim.Adam(lr=lr))

    @property
    def val_horizons(self) -> list[int]:
        """The horizons a family is validated at (``--val-horizons``; the run's ``--horizon`` by default)."""
        return list(self.cfg.val_horizons or [self.cfg.horizon])

    def _family_scores(self, opt) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Per component, -log(speedup over the Adam tuned for each validation member), and log(final / Adam's).

        With several validation horizons each member counts once per horizon, so a component's
        mean is the mean over horizons of its members' mean.
        """
        refs = self.extra["adam_members"]
        speed: dict[str, list[float]] = {}
        ratio: dict[str, list[float]] = {}
        for h in self.val_horizons:
            ref = refs[str(h)] if self.cfg.val_horizons else refs
            groups = validation.relative_scores(self.task, opt, range(VAL_SEEDS, VAL_SEEDS + self.cfg.val_seeds),
                                                h, ref, map_fn=self.dist.map)
            for g, vs in groups.items():
                speed.setdefault(g, []).extend(v[0] for v in vs)
                ratio.setdefault(g, []).extend(v[1] for v in vs)
        return speed, ratio

    def validate(self) -> float:
        """Score the optimizer on the fixed held-out members; ``val_groups`` holds the per-component means.

        A task: the mean final loss. A family: the mean over components of their members'
        -log(speedup over tuned Adam) (:mod:`l2o.validation`; ``val_loss_ratios``: the per-component
        mean log(final loss / tuned Adam's)).
        """
        self.val_loss_ratios = {}
        if self.is_family:
            speed, ratio = self._family_scores(self.opt)
            val, self.val_groups = validation.balanced_mean(speed)
            self.val_loss_ratios = validation.balanced_mean(ratio)[1]
        else:
            val, self.val_groups = self._score(self.opt), {}
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
                "meta_step": self.meta_step, "phase": self.phase, "rng": {"torch": torch.get_rng_state()}, "extra": self.extra,
                "distributed": {"world_size": self.dist.world_size, "backend": self.dist.backend}}

    def save(self, path: str | None = None) -> None:
        if not self.dist.is_main:  # [distributed] rank 0 alone writes
            return
        ckpt_io.save(path or self.cfg.checkpoint_path, self.state())

    def restore(self, ckpt: dict[str, Any]) -> None:
        old = TrainConfig.from_dict(ckpt["config"])
        diff = self.cfg.differences(old)
        if diff:
            shown = ", ".join(f"{k}={getattr(old, k)!r} (now {getattr(self.cfg, k)!r})" for k in diff[:3])
            raise UsageError(f"--resume: the checkpoint was made with {shown}; rerun with the same flags "
                             f"or start a new run with --name")
        self.opt.load_state_dict(ckpt["optimizer"]["state_dict"])
        if ckpt.get("phase", 0) != self.phase:  # the outer state below belongs to the stored phase
            self._build_phase(ckpt["phase"])
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
        tensorboard: bool = True, threads: int | None = None) -> MetaTrainer:
    """Meta-train as configured; checkpoint every ``save_every`` meta-steps and at the end.

    Args:
        cfg: the run's configuration.
        resume: continue from ``cfg.checkpoint_path`` (which must exist and agree with ``cfg``);
            without it an existing checkpoint is never overwritten.
        stop_after: stop (with a checkpoint) after this many (>= 1) meta-steps of this call.
        threads: torch threads of each rank under torchrun (an explicit ``--threads``); None: the
            default of :func:`l2o.distributed.threads_for`. One process keeps its own setting.

    Raises:
        UsageError: bad configuration or paths (found before any work).
        KeyboardInterrupt: with a message that says what the checkpoint holds, if any.
        AllSkipped: every meta-step of this call had a non-finite loss or meta-gradient.
    """
    import dataclasses

    # [distributed] join torchrun's group (none without torchrun); rank 0 reads the disk, decides for all
    cfg.validate()  # before joining a group: every rank refuses the same flags alike
    ctx = distributed.init(cfg.device, cfg.dist_backend, cfg.dist_timeout, threads)
    try:
        ctx.shard(cfg.meta_batch)  # a world size that does not divide the meta-batch is a usage error
        cfg = dataclasses.replace(cfg, device=distributed.device_for(ctx, cfg.device))
        return _fit(cfg, ctx, resume, stop_after, progress and ctx.is_main, tensorboard and ctx.is_main)
    except (ValueError, FileNotFoundError):  # bad input (UsageError, CheckpointError, DataNotFoundError)
        ctx.stop_together()  # every rank has it: leave together, exit 2 everywhere
        raise
    finally:
        ctx.close()


# an adapted scale's rule settings: they do not shape any weights, so --init-from ignores them (the run's own win)
_RULE_SETTINGS = ("init_log_scale", "shrink", "min_log_scale")


def _weights_config(opt: optim.DifferentiableOptimizer) -> dict[str, Any]:
    """An optimizer's config without what does not shape its weights (a wrapper's starting scale, shrink factor
    and floor, at any depth: the run's own win)."""
    def strip(c: Any) -> Any:
        if isinstance(c, dict):
            return {k: strip(v) for k, v in c.items() if k not in _RULE_SETTINGS}
        return [strip(v) for v in c] if isinstance(c, list) else c

    return strip(opt.config())


def _init_target(opt: optim.DifferentiableOptimizer, src: optim.DifferentiableOptimizer
                 ) -> optim.DifferentiableOptimizer | None:
    """The part of ``opt`` that ``--init-from``'s optimizer ``src`` starts: ``opt`` itself, or what ``opt`` wraps.

    ``--adaptive-scale`` wraps the run's optimizer and ``--plus`` adds a part after it, so
    a run's first part (and what that part wraps) can start from another run's weights.
    """
    candidates = [opt]
    if isinstance(opt, optim.Sum):
        candidates.append(opt.parts[0])
    if isinstance(candidates[-1], optim.AdaptiveScale):
        candidates.append(candidates[-1].base)
    return next((c for c in candidates if _weights_config(c) == _weights_config(src)), None)


def _fit(cfg: TrainConfig, ctx: distributed.Context, resume: bool, stop_after: int | None, progress: bool,
         tensorboard: bool) -> MetaTrainer:
    import os

    from .logging import RunLogger

    if stop_after is not None and stop_after < 1:
        raise UsageError(f"--stop-after must be a positive integer, got {stop_after}")
    path = cfg.checkpoint_path
    # [distributed] rank 0 reads the disk and decides for all ranks
    if ctx.decide(lambda: os.path.isdir(path)):
        raise UsageError(f"--checkpoint {path!r} is a folder; give a file path such as runs/NAME/checkpoint.pt")
    exists = ctx.decide(lambda: os.path.exists(path))
    if not resume and exists:
        raise UsageError(f"checkpoint {path!r} exists; pass --resume to continue it, or --name / --checkpoint "
                         f"for a new run (nothing was overwritten)")
    if resume and not exists:
        raise UsageError(f"--resume: no checkpoint at {path!r}; start the run without --resume")
    ctx.decide(lambda: _check_outputs(cfg))
    trainer = MetaTrainer(cfg)
    trainer.dist = ctx
    if resume:
        trainer.restore(ctx.decide(lambda: ckpt_io.load(path, "cpu" if ctx.active else cfg.device)))
    elif cfg.init_from:  # a curriculum stage: start from another run's best weights
        src = ctx.decide(lambda: ckpt_io.load_optimizer(cfg.init_from, "cpu" if ctx.active else cfg.device))
        target = _init_target(trainer.opt, src)
        if target is None:
            raise UsageError(f"--init-from {cfg.init_from!r} holds a {src.config()} optimizer, not {trainer.opt.config()}")
        target.load_state_dict(src.state_dict())
    if trainer.meta_step >= cfg.meta_steps:
        raise UsageError(f"the checkpoint has already run {trainer.meta_step} of {cfg.meta_steps} meta-steps; "
                         f"raise --meta-steps to train longer")
    run_config = {**cfg.to_dict(), "world_size": ctx.world_size, "dist_backend": ctx.backend}  # [distributed]
    log = RunLogger(cfg.run_dir, run_config, trainer.meta_step, cfg.meta_steps,
                    enabled=tensorboard, progress=progress)
    trainer.tune_adam()
    log.postfix["adam"] = f"{trainer.extra['adam_val']:.4g}"
    if cfg.init_from and trainer.meta_step == 0 and trainer.best is None:
        # the starting weights compete for "best" too: fine-tuning never keeps weights worse than its start
        log.scalar("val/learned", trainer.validate(), 0)
        for group, v in trainer.val_groups.items():
            log.scalar(f"val_family/{group}", v, 0)
    end = cfg.meta_steps if stop_after is None else min(cfg.meta_steps, trainer.meta_step + stop_after)
    few = sum(p.numel() for p in trainer.meta_params.values()) <= 64  # log hyperparameters one by one
    first, saved = trainer.meta_step, (trainer.meta_step if resume else None)
    skipped_before = trainer.extra["skipped"]

    def held() -> str:
        if saved is None:
            return (f"nothing was saved (the first checkpoint comes after {min(cfg.save_every, end) - first} "
                    f"meta-steps: --save-every); rerun to start again")
        return f"the checkpoint {path!r} holds meta-step {saved}: continue with --resume"

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
            for group, n in fig["member_grad_norms"].items():  # before --member-balance: which component dominates
                log.scalar(f"meta_member_grad_norm/{group}", n, step)
            if cfg.schedule is not None:
                log.scalar("meta/phase", trainer.phase + 1, step)
                log.scalar("meta/truncation", trainer.truncation, step)
            if few:
                for name, value in trainer.opt.hparams().items():
                    log.scalar(f"hparams/{name}", value, step)
                for name, g in getattr(trainer, "last_grads", {}).items():
                    g = g.detach()
                    log.scalar(f"hypergrad/{name}", float(g.norm()) if g.numel() > 1 else float(g), step)
            postfix = {"loss": fig["meta_loss"]}
            if step % cfg.val_every == 0 or step == cfg.meta_steps or trainer.phase_ends(step):
                val = trainer.validate()
                log.scalar("val/learned", val, step)
                log.scalar("val/adam_tuned", trainer.extra["adam_val"], step)
                for group, v in trainer.val_groups.items():  # a family: -log(speedup over tuned Adam)
                    log.scalar(f"val_family/{group}", v, step)
                for group, v in trainer.val_loss_ratios.items():
                    log.scalar(f"val_family_log_loss_ratio/{group}", v, step)
                if ctx.is_main:
                    log.histogram("opt/update_magnitude", torch.log10(trainer.update_magnitudes() + 1e-12), step)
                postfix.update(val=val, best=trainer.best["val_loss"] if trainer.best else None)
            if step % cfg.save_every == 0 or step == end:
                trainer.save()
                saved = step
            log.step(**postfix)
    except KeyboardInterrupt:
        log.close()
        raise KeyboardInterrupt(f"interrupted at meta-step {trainer.meta_step}; {held()}") from None
    except distributed.PeerLost as exc:  # [distributed] a peer died or went silent: say where to resume
        log.close()
        raise distributed.PeerLost(f"{exc}; {held()}") from None
    best = trainer.best["val_loss"] if trainer.best else math.nan
    log.close({"best_val": best, "adam_val": trainer.extra["adam_val"], "skipped": trainer.extra["skipped"]})
    ran, skipped = trainer.meta_step - first, trainer.extra["skipped"] - skipped_before
    if ran > 0 and skipped == ran:
        raise AllSkipped(f"all {ran} meta-steps were skipped (non-finite loss or meta-gradient), the optimizer "
                         f"did not change; check the initial values and --outer-lr (checkpoint {path!r})")
    return trainer
