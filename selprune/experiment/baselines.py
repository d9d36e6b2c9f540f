"""Running a gradient unlearning baseline (GA, GradDiff, NPO, NPO+RT, RMU) as a curve.

`unlearn` fine-tunes a model in place with one of `selprune.unlearning.METHODS` on the
same forget/retain collection windows the pruning runs score on, and evaluates forget and
retain on the same test windows at evenly spaced checkpoints: its records have the pruning
record format, so a baseline's curve and a pruning run's steps go on one frontier.

Fixed choices, shared with the relearning protocol (`selprune.experiment.retrain`): AdamW
(fused where torch has it, no weight decay), gradient clipping at norm 1, seeded batch
orders reshuffled each epoch, the caller's RNG state untouched. fp32 on the CPU is bit for
bit reproducible for a seed.

Compute (`ComputeMeter`, docs/method.md, "Gradient unlearning baselines"): tokens through
forward and through backward passes, a forward-equivalent count (forward + 2 x backward,
each pass weighted by the fraction of decoder blocks it runs through), wall seconds and
peak memory of the method's own work; evaluations are not counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment.config import FIELDS, Config, _bad, _check_type, stage_of
from selprune.experiment.retrain import MAX_GRAD_NORM, _adamw, _batch_order, _evaluate_both
from selprune.masked import require_causal
from selprune.models import check_window
from selprune.sites import KINDS, find_sites
from selprune.unlearning import METHODS, Hyper, State, StepBatch, UnlearnMethod, rmu_layer_for

RETAIN_ORDER_SEED = 1  # the retain batch order's seed is cfg.seed + this: independent of the forget order
_MB = 1 << 20


# ------------------------------------------------------------------------------ compute
def _rss_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; a no-op
    elsewhere). The heap keeps what earlier work freed, resident: measured from there, a
    method that reuses it looks as if it needed no memory (in one process, the second of two
    identical baselines measured a tenth of the first's peak)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_cpu_peak() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux `clear_refs` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class ComputeMeter:
    """Cumulative compute of a method's own work: token counts added by the caller,
    seconds and peak memory measured over the `measure()` blocks.

    Tokens count every position of every window through a pass; `depth` is the fraction
    of the decoder blocks the pass runs through (RMU stops at its layer, a collection pass
    runs the body only: depth 1). Embedding and LM head are not counted, nor attention's
    quadratic term. Peak memory: the most memory held above what was held when the meter
    was made (the weights, the data), over the measured blocks: CUDA allocated memory, or
    on a Linux CPU the process's peak resident memory (its `VmHWM`, reset before each
    block); None where neither can be read. On the CPU the heap's free pages are handed back
    before the baseline is read (`release_free_heap`), so the peak is the memory the work
    needed whatever ran before it in the process."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            release_free_heap()
        self.forward_tokens = self.backward_tokens = 0
        self.forward_equiv = 0.0
        self.seconds = 0.0
        self.peak_bytes: int | None = None
        self._base = self._now()

    def _now(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _rss_bytes("VmRSS") if self.device.type == "cpu" else None

    def forward(self, tokens: int, depth: float = 1.0) -> None:
        self.forward_tokens += tokens
        self.forward_equiv += tokens * depth

    def backward(self, tokens: int, depth: float = 1.0) -> None:
        self.backward_tokens += tokens
        self.forward_equiv += 2 * tokens * depth  # a backward pass costs about two forward passes

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        reset = not cuda and self._base is not None and _reset_cpu_peak()
        t = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated(self.device) if cuda else _rss_bytes("VmHWM") if reset else None
            if peak is not None and self._base is not None:
                self.peak_bytes = max(self.peak_bytes or 0, peak - self._base)

    def record(self) -> dict[str, Any]:
        return compute_record(self.forward_tokens, self.backward_tokens, self.forward_equiv, self.peak_bytes,
                              self.seconds)


def compute_record(forward_tokens: int, backward_tokens: int, forward_equiv_tokens: float | None = None,
                   peak_bytes: int | None = None, seconds: float = 0.0) -> dict[str, Any]:
    """The `compute` entry of a record. `forward_equiv_tokens` defaults to forward + 2 x
    backward (full-depth passes)."""
    equiv = forward_tokens + 2 * backward_tokens if forward_equiv_tokens is None else forward_equiv_tokens
    return {"forward_tokens": int(forward_tokens), "backward_tokens": int(backward_tokens),
            "forward_equiv_tokens": float(equiv),
            "peak_memory_mb": None if peak_bytes is None else round(peak_bytes / _MB, 1), "seconds": seconds}


# ----------------------------------------------------------------------------- checks
def _check_fields(cfg: Config) -> None:
    for name in [n for n in FIELDS if stage_of(n) == "unlearn"] + ["seed", "batch_size"]:
        value = getattr(cfg, name)
        _check_type(name, value)
        check = FIELDS[name].metadata["check"]
        if check is not None and (problem := check(value)) is not None:
            raise _bad(name, value, problem)
    if cfg.unlearn_checkpoints > cfg.unlearn_steps:
        raise _bad("unlearn_checkpoints", cfg.unlearn_checkpoints,
                   f"is more than unlearn_steps ({cfg.unlearn_steps}); lower it or raise unlearn_steps")


def _windows(w: torch.Tensor, side: str, method: str) -> torch.Tensor:
    if w is None or w.ndim != 2 or len(w) == 0 or w.shape[1] < 2:
        shape = None if w is None else tuple(w.shape)
        raise SelpruneError(f"method {method} needs {side} training windows [n >= 1, window >= 2]; got {shape}: "
                            f"give Data.{side}_train some windows")
    return w


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """`n` training steps evenly spaced over 1..steps, the last at `steps`."""
    return [round(i * steps / n) for i in range(1, n + 1)]


class Unlearner:
    """One baseline run: every hyperparameter checked when made (no work yet), then `run`."""

    def __init__(self, model: nn.Module, data: Data, cfg: Config, method: str,
                 base: dict[str, Any] | None = None):
        if method not in METHODS:
            raise SelpruneError(f"method={method!r} is not a baseline; pick one of {', '.join(METHODS)}")
        _check_fields(cfg)
        self.model, self.data, self.cfg = model, data, cfg
        self.base = base  # the model's metrics before training on these windows (record 0), if known
        self.method: UnlearnMethod = METHODS[method]
        self.forget = _windows(data.forget_train, "forget", method)
        self.retain = _windows(data.retain_train, "retain", method) if self.method.needs_retain else None
        check_window(model, max(w.shape[1] for w in (self.forget, self.retain) if w is not None))
        self.lr = cfg.unlearn_lr if cfg.unlearn_lr is not None else self.method.lr
        self.hp = self._hyper()
        self.checkpoints = checkpoint_steps(cfg.unlearn_steps, cfg.unlearn_checkpoints)
        self.state: State = {}

    def _hyper(self) -> Hyper:
        cfg, layer = self.cfg, 0
        if self.method.uses_layer:
            n = find_sites(self.model).n_layers
            layer = rmu_layer_for(n) if cfg.rmu_layer is None else cfg.rmu_layer
            if not 0 <= layer < n:
                raise _bad("rmu_layer", cfg.rmu_layer, f"is outside the model's {n} layers; use 0 to {n - 1}, "
                           "or None for the default")
        return Hyper(retain_weight=cfg.retain_weight, npo_beta=cfg.npo_beta, rmu_layer=layer,
                     rmu_coeff=cfg.rmu_coeff, rmu_alpha=cfg.rmu_alpha, rmu_layers=cfg.rmu_layers, seed=cfg.seed)

    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        """Train the model in place; the records (see `unlearn`)."""
        model = self.model
        device = next(model.parameters()).device
        flags = {p: p.requires_grad for p in model.parameters()}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            try:
                return self._run(device, progress)
            finally:
                for p, flag in flags.items():
                    p.requires_grad_(flag)
                model.eval()

    def _prepare(self, meter: ComputeMeter) -> None:
        """The method's frozen quantities, from the model before any update (counted)."""
        model, hp, m = self.model, self.hp, self.method
        model.eval()
        retain = self.retain if self.retain is not None else self.forget[:0]
        with meter.measure():
            self.state = m.prepare(model, self.forget, retain, hp, self.cfg.batch_size)
        n_layers = find_sites(model).n_layers if m.uses_layer else 1
        for used, w in zip(m.prepare_passes(hp), (self.forget, retain), strict=True):
            if used:
                meter.forward(w.numel(), m.forward_depth(hp, n_layers))

    # long: one loop that interleaves timed training steps with untimed evaluations
    def _run(self, device: torch.device, progress: bool) -> list[dict[str, Any]]:
        model, cfg, m, hp = self.model, self.cfg, self.method, self.hp
        meter = ComputeMeter(device)
        records = [self._record(0, 0, None, {}, 0.0, meter, progress, self.base)]
        self._prepare(meter)
        n_layers = find_sites(model).n_layers if m.uses_layer else 1
        params = m.params(model, hp)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = _adamw(params, cfg.replace(retrain_lr=self.lr))
        steps, batch = cfg.unlearn_steps, cfg.unlearn_batch
        f_order = _batch_order(len(self.forget), batch, steps, cfg.seed)  # [steps, batch]
        r_order = _batch_order(len(self.retain), batch, steps, cfg.seed + RETAIN_ORDER_SEED) \
            if self.retain is not None else None
        losses: list[float] = []
        terms: dict[str, list[float]] = {}
        t_train = 0.0
        for step in tqdm(range(1, steps + 1), desc=f"unlearn {m.name}", disable=not progress, leave=False):
            t = time.perf_counter()
            with meter.measure():
                model.train()
                b = StepBatch(self.forget[f_order[step - 1]].to(device), f_order[step - 1].to(device),
                              *((self.retain[r_order[step - 1]].to(device), r_order[step - 1].to(device))
                                if r_order is not None else ()))
                loss, parts = m.loss(model, b, self.state, hp)
                if not torch.isfinite(loss):
                    raise SelpruneError(f"{m.name} loss became {loss.item()} at step {step}; lower unlearn_lr "
                                        f"(now {self.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                opt.step()
            tokens = sum(x.numel() for x in (b.forget, b.retain) if x is not None)
            meter.forward(tokens, m.forward_depth(hp, n_layers))
            meter.backward(tokens, m.backward_depth(hp, n_layers))
            losses.append(loss.item())
            for k, v in parts.items():
                terms.setdefault(k, []).append(v.item())
            t_train += time.perf_counter() - t
            if step in self.checkpoints:
                means = {k: sum(v) / len(v) for k, v in terms.items()}
                records.append(self._record(len(records), step, sum(losses) / len(losses), means, t_train, meter,
                                            progress))
                losses, terms, t_train = [], {}, 0.0
        return records

    def _record(self, k: int, step: int, loss: float | None, terms: dict[str, float], t_train: float,
                meter: ComputeMeter, progress: bool, known: dict[str, Any] | None = None) -> dict[str, Any]:
        """Checkpoint `k` after training step `step`: evaluations (timed apart) and the counts.
        `known`: the metrics already measured on this model and these windows (not again)."""
        t = time.perf_counter()
        metrics = {side: known[side] for side in ("forget", "retain")} if known else \
            _evaluate_both(self.model, self.data, self.cfg, progress)
        return {"step": k, "train_step": step, "fraction": {kind: 0.0 for kind in KINDS}, **metrics,
                "train_loss": loss, "train_terms": terms,
                "seconds": {"train": t_train, "eval": time.perf_counter() - t}, "compute": meter.record()}


def unlearn(model: nn.Module, data: Data, cfg: Config, method: str, progress: bool = True,
            base: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train `model` **in place** with the baseline `method` (a key of
    `selprune.unlearning.METHODS`) for `cfg.unlearn_steps` steps; the records of its curve.

    Record 0 is the model before; then one record per checkpoint (`unlearn_checkpoints`
    evenly spaced, the last at `unlearn_steps`): `{step, train_step, fraction (0 for
    every neuron kind: nothing is pruned), forget, retain, train_loss (mean since the
    previous record), train_terms, seconds: {train, eval}, compute (cumulative, see
    `ComputeMeter`)}`. GA, GradDiff and NPO(+RT) train every parameter (whatever its
    `requires_grad` flag), RMU only its MLP output projections. Every hyperparameter is
    checked before any work; the model is left
    in eval mode, with its `requires_grad` flags and the caller's RNG state as they were.
    `base`: `{forget, retain}` metrics of `model` as it is on `data`'s test windows (the
    series' base.json), taken as record 0 instead of evaluating the same model again."""
    require_causal(model, f"the {method} baseline (a next-token loss)")
    return Unlearner(model, data, cfg, method, base).run(progress)
