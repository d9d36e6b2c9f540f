"""Activation statistics: streaming float64 sums per neuron, one forward pass per batch.

For every FF and attention neuron we keep, over all real (non-padding) tokens:
count n, sum x, sum x^2, sum |x|, count of x > 0, sum sqrt|x|, and optionally a coarse
histogram (for the mode, "peak"). Sums merge exactly across batches, processes and
machines by addition, and memory is O(neurons), never O(tokens).

Pruned neurons are read as removed: zeroing an output projection's input columns
leaves its *input* unchanged, so the collection hook multiplies the activations by a
keep-mask; otherwise a pruned neuron would keep its statistics and win the ranking again.

Under torch.distributed (`selprune.distributed`), `collect_stats` runs this rank's shard of
the windows and adds the sums over all ranks, so every rank gets the statistics of all the
windows: the same as one process, up to the float64 order of adding batches.

Definitions: docs/method.md, "Activation statistics".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from selprune import distributed
from selprune.errors import SelpruneError
from selprune.models import float64_device, input_device
from selprune.paths import atomic_write_bytes
from selprune.sites import KINDS, NeuronSites

FIELDS = ("sum", "sum_sq", "sum_abs", "count_pos", "sum_sqrt")
_ROW = {name: i for i, name in enumerate(FIELDS)}  # row of each field in a collector's stacked sums
_TILE_BYTES = 3 << 19  # 1.5 MiB of float32 activations per tile on the CPU (256 tokens of 1536 neurons)
_MAX_EXACT = (1 << 24) - 1  # float32 counts 0/1 exactly up to here: the most rows in one tile
DEFAULT_HIST_RANGE = (-4.0, 4.0)
# Devices whose histograms count with bincount: the fastest on the CPU, where its host read
# of the largest index costs nothing, and on MPS, whose sums live on the CPU anyway.
# Elsewhere (CUDA) an index_add_ counts without a device-to-host sync.
_BINCOUNT_DEVICES = ("cpu", "mps")


@dataclass
class ActivationStats:
    """Per-neuron sums for both kinds. `sums[kind][field]` has the neuron shape of `kind`
    (ff `[n_layers, d_mlp]`, attn `[n_layers, n_heads, d_head]`), float64 on the CPU;
    `hist[kind]` adds a trailing `[n_bins]` axis (bins spanning `hist_range`, with the
    outermost bins catching everything beyond it)."""

    n_tokens: int
    sums: dict[str, dict[str, torch.Tensor]]
    hist: dict[str, torch.Tensor] = field(default_factory=dict)
    hist_range: tuple[float, float] = DEFAULT_HIST_RANGE
    meta: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- derived moments
    def mean(self, kind: str) -> torch.Tensor:
        return self.sums[kind]["sum"] / max(self.n_tokens, 1)

    def moment(self, kind: str, name: str) -> torch.Tensor:
        """A per-token average of one of the FIELDS."""
        return self.sums[kind][name] / max(self.n_tokens, 1)

    def peak(self, kind: str) -> torch.Tensor:
        """The mode: centre of each neuron's fullest histogram bin (lowest bin on ties)."""
        if kind not in self.hist:
            raise SelpruneError("peak (mode) needs a histogram: collect with hist_bins > 0")
        h = self.hist[kind]
        lo, hi = self.hist_range
        width = (hi - lo) / h.shape[-1]
        return lo + (h.argmax(-1).double() + 0.5) * width

    def shape(self, kind: str) -> tuple[int, ...]:
        return tuple(self.sums[kind]["sum"].shape)

    # --------------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        """Write as safetensors, with the metadata as JSON in the header; atomic."""
        tensors = {f"{k}.{f}": t.contiguous() for k in KINDS for f, t in self.sums[k].items()}
        tensors.update({f"{k}.hist": t.contiguous() for k, t in self.hist.items()})
        header = {"n_tokens": self.n_tokens, "hist_range": list(self.hist_range), "meta": self.meta}
        atomic_write_bytes(path, save(tensors, metadata={"selprune": json.dumps(header, sort_keys=True)}))

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        path = Path(path)
        if not path.is_file():
            raise SelpruneError(f"statistics file {path} does not exist; collect statistics first")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                header = json.loads((f.metadata() or {})["selprune"])
            tensors = load_file(str(path))
            sums = {k: {f: tensors[f"{k}.{f}"] for f in FIELDS} for k in KINDS}
            n_tokens, hist_range = int(header["n_tokens"]), tuple(header["hist_range"])
        except (KeyError, ValueError, OSError, json.JSONDecodeError, Exception) as e:  # noqa: B014
            raise SelpruneError(
                f"statistics file {path} is corrupt or not a selprune statistics file ({type(e).__name__}: {e}); "
                "delete it and collect again"
            ) from e
        hist = {k: tensors[f"{k}.hist"] for k in KINDS if f"{k}.hist" in tensors}
        return cls(n_tokens, sums, hist, hist_range, header.get("meta", {}))

    def check_matches(self, sites: NeuronSites, model_name: str | None = None) -> None:
        """Refuse statistics from another model: shapes (and model name, if recorded) must match."""
        for kind in KINDS:
            if self.shape(kind) != sites.shape(kind):
                raise SelpruneError(
                    f"statistics have {kind} shape {self.shape(kind)} but the model has {sites.shape(kind)}: "
                    f"they come from another model ({self.meta.get('model', '?')}); collect them again for this model"
                )
        recorded = self.meta.get("model")
        if model_name and recorded and recorded != model_name:
            raise SelpruneError(
                f"statistics were collected on model {recorded!r}, not {model_name!r}; collect them again"
            )


def empty_stats(sites: NeuronSites, hist_bins: int = 0, device: torch.device | str = "cpu") -> ActivationStats:
    def zeros(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=device)

    sums = {k: {f: zeros(sites.shape(k)) for f in FIELDS} for k in KINDS}
    hist = {k: zeros((*sites.shape(k), hist_bins)) for k in KINDS} if hist_bins else {}
    return ActivationStats(0, sums, hist)


# ------------------------------------------------------------------------ collection
def _float64_slot(store: dict[tuple[str, int], torch.Tensor], key: tuple[str, int], shape: tuple[int, ...],
                  device: torch.device) -> torch.Tensor:
    """`store[key]`: float64 sums of `shape` on `float64_device(device)`, made (zeros) where
    missing, moved where they live elsewhere (made on the weight's device, the input is on another)."""
    want, t = float64_device(device), store.get(key)
    if t is None or t.device != want:
        t = store[key] = torch.zeros(shape, dtype=torch.float64, device=want) if t is None else t.to(want)
    return t


class StatsCollector:
    """Forward pre-hooks on every output projection that add each batch into the sums.

    Use as a context manager around forward passes of fixed-length windows (every
    token is real: selprune never pads). Sums stay on the activations' device until `result()` (each
    layer's on its own device, for a model sharded over several), so there is no
    device-to-host copy per batch (except on MPS, which has no float64: see
    `models.float64_device`).
    """

    def __init__(
        self,
        sites: NeuronSites,
        removed: dict[str, torch.Tensor] | None = None,
        hist_bins: int = 0,
        hist_range: tuple[float, float] = DEFAULT_HIST_RANGE,
    ) -> None:
        self.sites = sites
        self.removed = removed or {}
        self.hist_bins = hist_bins
        self.hist_range = hist_range
        self.n_tokens = 0
        self._acc: dict[tuple[str, int], torch.Tensor] = {}  # [FIELDS, d_in] float64 sums, on the layer's device
        self._hist: dict[tuple[str, int], torch.Tensor] = {}  # [d_in * hist_bins] float64 counts, likewise
        self._keep: dict[tuple[str, int], torch.Tensor] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> StatsCollector:
        for kind in KINDS:
            for layer, module in enumerate(self.sites.modules(kind)):
                self._allocate(kind, layer, module)
                self._handles.append(module.register_forward_pre_hook(self._hook(kind, layer)))
        return self

    def _allocate(self, kind: str, layer: int, module: nn.Module) -> None:
        """Make a layer's sums (and keep-mask, histogram) now, before any forward pass.

        Made lazily in the hook, these small long-lived tensors landed on the CPU heap above
        the forward's freed activation temporaries, one per layer, so glibc could neither
        trim nor reuse that space: measured on the default model at 8 x 256 tokens, the heap
        grew to 700 MB with 500 MB of it free, the pruning step's peak resident memory varied
        by 300 MB from run to run. Made up front, the collection peaks ~40 MB above the
        model. On a parameter-less or meta-device module (offloaded) the hook makes them."""
        param = next(module.parameters(), None)
        if param is None or param.device.type == "meta":
            return
        key, d = (kind, layer), math.prod(self.sites.shape(kind)[1:])
        _float64_slot(self._acc, key, (len(FIELDS), d), param.device)
        removed = self.removed.get(kind)
        if removed is not None:
            self._keep[key] = (~removed[layer].reshape(-1)).to(param.device, torch.float32)
        if self.hist_bins:
            _float64_slot(self._hist, key, (d * self.hist_bins,), param.device)

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._scratch.clear()

    def _hook(self, kind: str, layer: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()  # [batch, pos, d_in]; statistics are never differentiated
            x = x.reshape(-1, x.shape[-1])  # [tokens, d_in]
            if kind == KINDS[0] and layer == 0:  # once per forward pass
                self.n_tokens += x.shape[0]
            key = (kind, layer)
            keep = None
            removed = self.removed.get(kind)
            if removed is not None:
                keep = self._keep.get(key)
                if keep is None or keep.device != x.device:
                    keep = self._keep[key] = (~removed[layer].reshape(-1)).to(x.device, torch.float32)
            self._add(key, x, keep)

        return hook

    def _buffer(self, slot: int, shape: tuple[int, ...], device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A scratch tensor of `shape`, reused from call to call: a fresh activation-sized
        temporary per call costs allocation, page faults and cache misses."""
        n, key = math.prod(shape), (slot, device, dtype, torch.is_inference_mode_enabled())
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = self._scratch[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def _add(self, key: tuple[str, int], x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add one batch, `x` `[tokens, d_in]` in any float dtype (times `keep` if given), to the sums.

        The batch goes through in tiles of rows: on the CPU small enough (_TILE_BYTES) for
        every map below to find its tile in cache (~1.8x faster than whole-batch passes),
        elsewhere the whole batch at once. Per tile, x in float32 (upcast and masked into a
        reused buffer, unless it already is plain float32), x^2, |x|, sqrt|x| and x > 0 (as
        float32 0/1) are written one after another into one reused buffer and summed over
        the tile's tokens in float32 (at most a few hundred tokens on the CPU: ~1e-7 relative
        error; counts exact); the tiles' sums are added in float64, all five fields at once.
        """
        t, d = x.shape
        rows = max(1, min(t, _TILE_BYTES // (4 * d) if x.device.type == "cpu" else t, _MAX_EXACT))
        work = self._buffer(1, (rows, d), x.device)
        part = self._buffer(2, (len(FIELDS), d), x.device)
        acc = _float64_slot(self._acc, key, (len(FIELDS), d), x.device)  # made in _allocate, unless meta/param-less
        bins = self.hist_bins
        itype = torch.int32 if d * bins < 2**31 else torch.int64
        idx = self._buffer(4, (t, d), x.device, itype) if bins else None  # histogram bin of each value
        for start in range(0, t, rows):  # a handful of tiles, each of hundreds of tokens
            xs = x[start : start + rows]
            n = xs.shape[0]
            if keep is not None:
                xs = torch.mul(xs, keep, out=self._buffer(0, (rows, d), x.device)[:n])
            elif xs.dtype != torch.float32:
                xs = self._buffer(0, (rows, d), x.device)[:n].copy_(xs)
            w = work[:n]
            torch.sum(xs, 0, out=part[_ROW["sum"]])
            torch.sum(torch.mul(xs, xs, out=w), 0, out=part[_ROW["sum_sq"]])
            torch.sum(torch.abs(xs, out=w), 0, out=part[_ROW["sum_abs"]])
            torch.sum(w.sqrt_(), 0, out=part[_ROW["sum_sqrt"]])
            torch.sum(torch.gt(xs, 0, out=w), 0, out=part[_ROW["count_pos"]])
            acc += part.to(acc.device)  # no copy unless the sums live elsewhere (MPS)
            if bins:
                # floor((x - lo) * scale) clamped to [0, bins - 1], computed as clamp-then-
                # truncate (the same integer for every value, inf included)
                lo, hi = self.hist_range
                torch.sub(xs, lo, out=w).mul_(bins / (hi - lo)).clamp_(0, bins - 1)
                idx[start : start + n].copy_(w)
        if bins:  # neuron j's bins are offset by j * bins: one count over all neurons
            idx += torch.arange(0, d * bins, bins, device=x.device, dtype=itype)
            hist = _float64_slot(self._hist, key, (d * bins,), x.device)
            if x.device.type in _BINCOUNT_DEVICES:
                hist += torch.bincount(idx.view(-1), minlength=d * bins).to(hist.device)
            else:  # bincount reads its largest index back to the host to size its output: a sync per batch
                hist.index_add_(0, idx.view(-1), torch.ones((), dtype=hist.dtype, device=x.device).expand(t * d))

    def result(self, meta: dict[str, Any] | None = None, sum_over_ranks: bool = False) -> ActivationStats:
        """Gather the sums on the CPU, one transfer per layer; with `sum_over_ranks`, add
        them over the ranks of torch.distributed (each saw its own shard of the tokens; a
        rank that saw none adds zeros), in one collective; then check them for NaN/inf.

        The check comes after the sum so that every rank sees the same numbers and raises
        the same error, rather than one rank failing while the others wait for it."""
        stats = empty_stats(self.sites, self.hist_bins)
        stats.hist_range = self.hist_range
        for (kind, layer), acc in self._acc.items():
            shape = self.sites.shape(kind)[1:]
            acc = acc.cpu()
            for name in FIELDS:
                stats.sums[kind][name][layer] = acc[_ROW[name]].reshape(shape)
            if self.hist_bins:
                stats.hist[kind][layer] = self._hist[(kind, layer)].cpu().reshape(*shape, self.hist_bins)
        count = torch.tensor([self.n_tokens], dtype=torch.int64)
        if sum_over_ranks:
            distributed.all_reduce_sum_([*(stats.sums[k][f] for k in KINDS for f in FIELDS), *stats.hist.values(), count])
        stats.n_tokens = int(count)
        for layer in range(self.sites.n_layers):
            for kind in ("attn", "ff"):  # the order a block runs them in: the first bad one is named
                if not all(bool(stats.sums[kind][n][layer].isfinite().all()) for n in ("sum", "sum_sq")):
                    raise SelpruneError(
                        f"NaN or inf in the {kind} activations of layer {layer}: the model overflows in this dtype "
                        "or its weights are broken; try dtype='float32'"
                    )
        stats.meta = dict(meta or {}, tokens=stats.n_tokens)
        return stats


def collect_stats(
    model: nn.Module,
    sites: NeuronSites,
    windows: torch.Tensor,
    batch_size: int = 8,
    removed: dict[str, torch.Tensor] | None = None,
    hist_bins: int = 0,
    hist_range: tuple[float, float] = DEFAULT_HIST_RANGE,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "collect",
) -> ActivationStats:
    """Run `windows` (`[n, window]` token ids, or an image classifier's pixel values
    `[n, C, h, w]`) through the model and return the statistics.

    Only the transformer body runs (no LM head: statistics need no logits). `removed`
    maps kind to a bool mask of pruned neurons, which read as zero. `batch_size` windows
    go through per forward pass: on a GPU, raise it until memory runs short (README,
    "Scaling up"). Under torch.distributed, every rank passes the same `windows`, runs its
    shard (`distributed.shard`) and gets the statistics of all of them.
    """
    body = getattr(model, model.base_model_prefix, model)
    device = input_device(model)
    windows = distributed.shard(windows, batch_size)  # this rank's batches (all of them single-process)
    collector = StatsCollector(sites, removed, hist_bins, hist_range)
    was_training = model.training
    model.eval()  # no dropout noise in the statistics (a model built from a config starts in training mode)
    try:
        with torch.inference_mode(), collector:
            for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
                batch = windows[start : start + batch_size].to(device)
                if batch.is_floating_point():  # an image classifier's pixel values [batch, C, h, w]
                    body(pixel_values=batch)
                else:  # token ids [batch, pos]
                    body(input_ids=batch, use_cache=False)
    finally:
        model.train(was_training)
    return collector.result(meta, sum_over_ranks=distributed.is_active())
