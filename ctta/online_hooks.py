"""Hooks for sample streams (`ctta.loop.run_samples`): online accuracy and calibration, latency, memory.

Observers only, like `ctta.hooks`: they read the batch the runner reports in ``on_batch_end`` (``ctx.logits``,
``ctx.labels``, ``ctx.seconds``, ``ctx.position``, ``ctx.task``) and write into ``ctx.results`` at the end of each
task and of the run (so `JsonResults`, placed after them, writes their figures). Their accumulators are in
``state_dict`` so that a resumed stream continues them.
"""
from __future__ import annotations

import array
import resource
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctta.metrics import expected_calibration_error


class OnlineAccuracy:
    """Accuracy of the adapter's predictions (made while adapting, as TTA benchmarks score them) per domain and
    cumulative over the stream, and ECE with ``n_bins`` equal-width bins (C-TPT's 20) per domain and overall.
    Each domain's accuracy is also given in ``parts`` consecutive stretches of (near) equal length (quarters by
    default): a stream method that adapts gains more in the later stretches than in the first, while a
    non-adapting one only varies by sampling — the warm-up a cache or a memory needs, seen per domain.
    Writes ``results["online"]``."""

    def __init__(self, n_bins: int = 20, parts: int = 4):
        if parts < 1:
            raise ValueError(f"parts must be at least 1, got {parts}")
        self.n_bins, self.parts = n_bins, parts
        # name -> (confidence, correct) per sample: 5 bytes a sample, no Python object per sample
        self.domains: dict[str, tuple[array.array, array.array]] = {}

    def on_batch_end(self, ctx) -> None:
        probs = ctx.logits.detach().float().softmax(-1).cpu()
        conf, pred = probs.max(-1)
        c, k = self.domains.setdefault(ctx.task.name, (array.array("f"), array.array("b")))
        c.extend(conf.tolist())
        k.extend((pred == ctx.labels.cpu()).tolist())

    def _arrays(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (torch.tensor(c, dtype=torch.float32), torch.tensor(k, dtype=torch.bool))
                for name, (c, k) in self.domains.items() if c}

    def summary(self) -> dict:
        per, confs, corrs = {}, [], []
        for name, (conf, corr) in self._arrays().items():
            acc = float(corr.double().mean())
            per[name] = {"accuracy": acc, "error": 1 - acc, "n": len(corr),
                         "ece": expected_calibration_error(conf, corr, self.n_bins),
                         # stretches in stream order; fewer samples than parts: the empty stretches are None
                         "accuracy_by_part": [float(p.double().mean()) if len(p) else None
                                              for p in torch.tensor_split(corr, self.parts)]}
            confs.append(conf)
            corrs.append(corr)
        if not per:
            return {"per_domain": {}, "n": 0}
        conf, corr = torch.cat(confs), torch.cat(corrs)  # domains in the order the stream visited them
        return {"per_domain": per, "n": len(corr), "cumulative_accuracy": float(corr.double().mean()),
                "curve": self.curve(corr),
                "mean_domain_accuracy": float(np.mean([v["accuracy"] for v in per.values()])),
                "mean_domain_error": float(np.mean([v["error"] for v in per.values()])),
                "ece": expected_calibration_error(conf, corr, self.n_bins), "ece_bins": self.n_bins,
                "parts": self.parts}

    @staticmethod
    def curve(correct: Tensor, points: int = 200) -> dict:
        """Cumulative online accuracy against stream position, at most ``points`` evenly spaced positions (the
        last sample always included): the curve TTA papers plot to show adaptation (or collapse) along a stream."""
        n = len(correct)
        every = max(1, -(-n // points))
        pos = torch.arange(every, n + 1, every)
        if len(pos) == 0 or pos[-1] != n:
            pos = torch.cat([pos, torch.tensor([n])])
        cum = correct.double().cumsum(0)[pos - 1] / pos.double()
        return {"every": every, "position": pos.tolist(), "cumulative_accuracy": cum.tolist()}

    def on_task_end(self, ctx) -> None:
        ctx.results["online"] = self.summary()

    on_run_end = on_task_end

    def state_dict(self) -> dict:
        return {name: {"confidence": c, "correct": k} for name, (c, k) in self._arrays().items()}

    def load_state_dict(self, state: dict) -> None:
        self.domains = {name: (array.array("f", d["confidence"].tolist()), array.array("b", d["correct"].tolist()))
                        for name, d in state.items()}


class Latency:
    """Per-sample latency (adapter call time / batch size; CUDA synchronised by the runner) p50 / p95 / mean / max
    and throughput in samples/s of adapter time. The first ``warmup`` calls (text-head build, allocator warm-up)
    are left out of the figures. Writes ``results["latency"]``."""

    def __init__(self, warmup: int = 0):
        self.warmup = warmup
        self.seconds = array.array("d")  # per call
        self.sizes = array.array("q")

    def on_batch_end(self, ctx) -> None:
        self.seconds.append(ctx.seconds)
        self.sizes.append(len(ctx.labels))

    def summary(self) -> dict:
        s = np.frombuffer(self.seconds, dtype=np.float64)[self.warmup:]
        n = np.frombuffer(self.sizes, dtype=np.int64)[self.warmup:]
        if s.size == 0:
            return {"calls": 0}
        per = np.repeat(s / n, n) * 1e3  # every sample of a batch waited for the whole batch's share
        return {"p50_ms": float(np.percentile(per, 50)), "p95_ms": float(np.percentile(per, 95)),
                "mean_ms": float(per.mean()), "max_ms": float(per.max()),
                "samples_per_s": float(n.sum() / s.sum()), "calls": int(s.size), "samples": int(n.sum()),
                "warmup_calls": self.warmup}

    def on_task_end(self, ctx) -> None:
        ctx.results["latency"] = self.summary()

    on_run_end = on_task_end

    def state_dict(self) -> dict:
        return {"seconds": torch.tensor(self.seconds.tolist(), dtype=torch.float64),
                "sizes": torch.tensor(self.sizes.tolist(), dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = array.array("d", state["seconds"].tolist())
        self.sizes = array.array("q", state["sizes"].tolist())


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux ``/proc/self/statm``; elsewhere the peak, the best we have)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * resource.getpagesize() / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10


class Memory:
    """Resident memory sampled every ``every`` samples (to show it stays flat: the mean over the first, the middle
    and the last 10 % of the samples; allocator warm-up shows early, a leak keeps growing in the second half), the process's peak RSS and, on CUDA, ``max_memory_allocated``.
    Writes ``results["memory"]``."""

    def __init__(self, every: int = 10):
        self.every = every
        self.rss = array.array("d")
        self.cuda = array.array("d")
        self._device = None

    def on_run_start(self, ctx) -> None:
        self._device = ctx.model.device

    def on_batch_end(self, ctx) -> None:
        if ctx.position // self.every > (ctx.position - len(ctx.labels)) // self.every:
            self.rss.append(current_rss_mb())
            if self._device is not None and self._device.type == "cuda":
                self.cuda.append(torch.cuda.memory_allocated(self._device) / 2**20)

    @staticmethod
    def _ends(trace: array.array) -> dict:
        a = np.frombuffer(trace, dtype=np.float64)
        k = max(1, a.size // 10)
        first, last = float(a[:k].mean()), float(a[-k:].mean())
        mid = float(a[a.size // 2 - k // 2: a.size // 2 - k // 2 + k].mean())  # warm-up vs steady growth
        return {"first_10pct_mb": first, "middle_10pct_mb": mid, "last_10pct_mb": last, "growth_mb": last - first,
                "second_half_growth_mb": last - mid,
                "min_mb": float(a.min()), "max_mb": float(a.max()), "points": int(a.size)}

    def summary(self) -> dict:
        # ru_maxrss is updated lazily by the kernel, so a fresh /proc reading can exceed it: take the larger
        out: dict = {"peak_rss_mb": max([peak_rss_mb(), *self.rss])}
        if self.rss:
            out["rss"] = self._ends(self.rss)
        if self._device is not None and self._device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self._device) / 2**20
            if self.cuda:
                out["cuda_allocated"] = self._ends(self.cuda)
        return out

    def on_task_end(self, ctx) -> None:
        ctx.results["memory"] = self.summary()

    on_run_end = on_task_end
