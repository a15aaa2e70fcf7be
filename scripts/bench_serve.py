"""Load test of `ctta serve` on 127.0.0.1: requests/s and latency at concurrency 1, 8, 32, then SIGTERM under load.

1. In process, the reference: `ctta.wrap` (ZeroShot on the micro-CLIP) called on one decoded PNG at a time (batch 1),
   and on 32 at a time (the model's own batching gain: the ceiling of what micro-batching can buy on this device).
2. The real server (``python scripts/serve.py``, a child process) with ZeroShot, driven by an async HTTP client
   (`Connection`: HTTP/1.1 keep-alive on asyncio streams, one connection per concurrent client; httpx's
   AsyncClient costs several ms of CPU a request here, more than the server's own overhead, and client and server
   share this machine's cores) at concurrency 1, 8 and 32 for a bounded number of requests, each a distinct rendered
   world image (`streams.world.render_per_class`, PNG): requests/s, p50/p95/p99 latency, errors, the mean micro-batch (from the
   server's /metrics), and the ratios to concurrency 1 and to the in-process batch-1 figure.
3. Restart: a server with an online strategy (default TDA with one view: a training-free cache that changes with
   every sample and works at any batch size on any tower; ``--restart-strategy tent`` for TENT) and a state path, at
   concurrency 32; SIGTERM once half the requests are answered; the
   client keeps going, retrying what the draining server refused (503) or never read (connection refused/closed);
   the server is started again on the same state path and the client finishes. Checks: the state written at exit
   holds exactly the answered requests (positions 0..n-1 once each, the server's sample count equals the answered
   images: none lost, none adapted without an answer), the restarted server reports that it resumed, and its
   prediction of a probe image equals the one an in-process adapter makes from the state file.

Client and server share this machine's cores; on a loaded machine compare the ratios of one run, not absolute rates.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

import ctta
from benchlib import ROOT, bench_parser, finish, ratio, start, table
from ctta.strategies.zeroshot import ZeroShot
from streams.world import combo_classes, combo_space, render_per_class

LEVELS = (1, 8, 32)
RESTART = {"tda": ["strategy=tda", "strategy.n_views=0", "strategy.augmix=false"], "tent": ["strategy=tent"]}
STARTED: list["Server"] = []  # every server this run started: none outlives the benchmark, whatever fails


def images(n: int, seed: int) -> list[bytes]:
    """``n`` distinct rendered world images as PNG bytes (100 classes, random nuisances)."""
    per_class = -(-n // 100)
    ds = render_per_class(combo_classes(), per_class, seed)
    order = torch.randperm(len(ds.images), generator=torch.Generator().manual_seed(seed))[:n]
    out = []
    for i in order.tolist():
        buf = io.BytesIO()
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class InProcess:
    """The reference: `ctta.wrap` (ZeroShot, no feature cache) in this process; decode + predict per request."""

    def __init__(self):
        self.adapter = ctta.wrap(ctta.Clip.from_pretrained("micro-clip", "builtin"), ZeroShot(cache=False),
                                 combo_space())
        self.calls, self.wall = 0, 0.0

    def batch1(self, data: list[bytes]) -> None:
        t = time.perf_counter()
        for d in data:
            self.adapter(Image.open(io.BytesIO(d)))
        self.wall += time.perf_counter() - t
        self.calls += len(data)

    def batch32(self, data: list[bytes]) -> float:
        """Images/s at batch 32: what the model gains from batching on this device, the ceiling of micro-batching."""
        t = time.perf_counter()
        for i in range(0, len(data), 32):
            self.adapter([Image.open(io.BytesIO(d)) for d in data[i:i + 32]])
        return len(data) / (time.perf_counter() - t)


class Server:
    """``python scripts/serve.py`` in a child process on a free port, its log in a file."""

    def __init__(self, overrides: list[str], log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        STARTED.append(self)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/serve.py"), f"port={self.port}",
                                      "log_level=warning", *overrides], stdout=open(log, "ab"),
                                     stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 300  # imports alone can take a minute on a loaded machine
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"server not ready in 300 s:\n{log.read_text()[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a body, read the status and the Content-Length body. Raises
    ConnectionError (refused, reset, or closed before a response) and reconnects on the next call."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: image/png\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await self.writer.drain()
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict((k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in head[1:] if h))
            data = await self.reader.readexactly(int(headers.get("content-length", 0)))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            self.close()
            raise ConnectionError(f"{type(e).__name__}: {e}") from None
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(head[0].split()[1]), data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def drive(url: str, data: list[bytes], concurrency: int) -> tuple[list[float], dict[str, int], float]:
    """``len(data)`` POST /predict at ``concurrency``: (latencies of the answered, errors by status, wall seconds)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue = list(range(len(data)))

    async def worker() -> None:
        conn = Connection(url)
        while queue:
            d = data[queue.pop()]
            t = time.perf_counter()
            try:
                status, _ = await conn.post("/predict", d)
            except ConnectionError:
                status = "connection"
            if status == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0


def load_levels(data: list[bytes], counts: dict[int, int], rounds: int, ref: InProcess, ref_data: list[bytes],
                threads: int, log: Path) -> list[dict]:
    """``rounds`` rounds, each: the in-process reference, then concurrency 1, 8, 32 (a share of each level's
    requests), so that a change of the machine's load hits every contender alike; figures pooled per level."""
    server = Server(["strategy=zeroshot", "strategy.cache=false", f"threads={threads}"], log)
    acc = {c: {"lat": [], "errors": {}, "wall": 0.0, "calls": 0.0, "images": 0.0} for c in LEVELS}
    pos = {c: 0 for c in LEVELS}
    offsets = {c: sum(counts[k] for k in LEVELS if k < c) for c in LEVELS}
    try:
        asyncio.run(drive(server.url, ref_data[:16], 4))  # warm-up: connections, first calls
        ref.batch1(ref_data[:4])
        ref.calls, ref.wall = 0, 0.0
        for r in range(rounds):
            share = len(ref_data) // rounds
            ref.batch1(ref_data[r * share:(r + 1) * share])
            for c in LEVELS:
                n = counts[c] // rounds + (counts[c] % rounds if r == rounds - 1 else 0)
                part = data[offsets[c] + pos[c]:offsets[c] + pos[c] + n]
                pos[c] += n
                before = httpx.get(server.url + "/metrics").text
                lat, errors, wall = asyncio.run(drive(server.url, part, c))
                after = httpx.get(server.url + "/metrics").text
                a = acc[c]
                a["lat"] += lat
                a["wall"] += wall
                for k, v in errors.items():
                    a["errors"][k] = a["errors"].get(k, 0) + v
                a["calls"] += metric(after, "ctta_batch_images_count") - metric(before, "ctta_batch_images_count")
                a["images"] += metric(after, "ctta_batch_images_sum") - metric(before, "ctta_batch_images_sum")
    finally:
        server.stop()
    rows = []
    for c in LEVELS:
        a = acc[c]
        q = statistics.quantiles(a["lat"], n=100) if len(a["lat"]) > 1 else [a["lat"][0]] * 99
        rows.append({"concurrency": c, "requests": counts[c], "ok": len(a["lat"]), "errors": a["errors"],
                     "wall_s": a["wall"], "rps": len(a["lat"]) / a["wall"], "p50_ms": 1000 * q[49],
                     "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98],
                     "mean_batch_images": a["images"] / a["calls"] if a["calls"] else None})
    return rows


def reference(overrides: list[str]) -> ctta.OnlineAdapter:
    """The adapter scripts/serve.py builds from ``overrides``, built here from the same composed config (so that
    its recorded configuration, hence the state file's fingerprint, is the server's)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("serve", overrides=overrides)
    strategy = instantiate(OmegaConf.to_container(cfg.strategy, resolve=True), _convert_="all")
    return ctta.wrap(instantiate(cfg.model), strategy, instantiate(cfg.label_space), reset=cfg.reset,
                     seed=cfg.seed)


async def restart_run(data: list[bytes], strategy: str, concurrency: int, threads: int, folder: Path,
                      log: Path) -> dict:
    """SIGTERM at half the answers, restart on the same state path, finish; see the module docstring."""
    state = folder / "state.pt"
    overrides = [*RESTART[strategy], f"threads={threads}", f"serve.state_path={state}"]
    server = await asyncio.to_thread(Server, overrides, log)
    todo = list(range(len(data)))
    answered: dict[int, dict] = {}
    retried = closed = 0
    sigterm_at = len(data) // 2
    ready = asyncio.Event()
    ready.set()
    urls = [server.url]

    async def worker() -> None:
        nonlocal retried, closed
        conn = Connection(urls[-1])
        while todo:
            await ready.wait()
            if not todo:  # taken by another worker meanwhile (one whose request fails puts it back and goes on)
                break
            if conn.port != int(urls[-1].rsplit(":", 1)[1]):
                conn.close()
                conn = Connection(urls[-1])  # the restarted server listens on another free port
            i = todo.pop(0)
            try:
                status, body = await conn.post("/predict", data[i])
            except ConnectionError:  # refused, or closed by the draining server before it read the request
                closed += 1
                status, body = None, b""
            if status == 200:
                answered[i] = json.loads(body)
                continue
            if status not in (None, 503):  # 503: draining; None: not read. Both are retried after the restart
                raise RuntimeError(f"unexpected {status}: {body[:300]!r}")
            retried += 1
            todo.append(i)
            await asyncio.sleep(0.05)
        conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    while len(answered) < sigterm_at:
        await asyncio.sleep(0.01)
    t_term = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(server.proc.wait, 120)
    drain_s = time.perf_counter() - t_term
    ready.clear()  # the client waits for the restart (a real client would go to another replica)
    first_run = len(answered)
    saved = ctta.io.safe_torch_load(state)["counters"]["samples"] if state.exists() else None
    server = await asyncio.to_thread(Server, overrides, log)
    health = httpx.get(server.url + "/healthz").json()
    urls.append(server.url)
    ready.set()
    await asyncio.gather(*workers)
    # the restarted server's state equals the file's: same prediction of a probe (adapt=false) as in process
    probe = data[0]
    served = httpx.post(server.url + "/predict?adapt=false&top_k=1", content=probe,
                        headers={"Content-Type": "image/png"}).json()["predictions"][0]
    final = httpx.get(server.url + "/healthz").json()
    server.stop()
    ref = reference(overrides)
    anchor = ref.predict(Image.open(io.BytesIO(probe))).probs.max().item()
    ref.load(state)  # the file the restarted server wrote at its own exit: resumed state + the second half
    offline = ref.predict(Image.open(io.BytesIO(probe)))
    positions = sorted(a["position"] for a in answered.values())
    return {"strategy": type(ref.strategy).__name__, "overrides": RESTART[strategy], "concurrency": concurrency, "requests": len(data), "answered": len(answered),
            "answered_before_sigterm_exit": first_run, "exit_code": exit_code, "drain_s": drain_s,
            "saved_samples_at_exit": saved, "resumed": health.get("resumed"), "resumed_samples": health.get("samples"),
            "final_samples": final["samples"], "retried": retried, "connection_refused_or_closed": closed,
            "positions_contiguous": positions == list(range(len(positions))),
            "lost": max(0, len(answered) - final["samples"]),
            "adapted_without_answer": max(0, final["samples"] - len(answered)),
            "probe_served_vs_file": abs(served["confidence"] - offline.probs.max().item()),
            "probe_class_matches": served["class"] == offline.classnames[0],
            "probe_moved_from_anchor": abs(offline.probs.max().item() - anchor)}


COLUMNS = [("concurrency", lambda r: r["concurrency"], ""), ("requests", lambda r: r["requests"], ""),
           ("req/s", lambda r: r["rps"], ".1f"), ("x c=1", lambda r: r["vs_c1"], ".2f"),
           ("x in-process b1", lambda r: r["vs_in_process"], ".2f"), ("p50 ms", lambda r: r["p50_ms"], ".1f"),
           ("p95 ms", lambda r: r["p95_ms"], ".1f"), ("p99 ms", lambda r: r["p99_ms"], ".1f"),
           ("errors", lambda r: sum(r["errors"].values()), ""), ("mean batch", lambda r: r["mean_batch_images"], ".1f")]


def main() -> None:
    p = bench_parser(__doc__, "benchmarks/results/serve.json")
    p.add_argument("--requests", type=int, nargs=3, default=[100, 200, 400], metavar=("C1", "C8", "C32"),
                   help="requests at concurrency 1, 8, 32 (default 100 200 400: about a minute on an idle 2-core CPU)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the levels (default 3)")
    p.add_argument("--restart-requests", type=int, default=200, help="requests of the SIGTERM/restart run")
    p.add_argument("--restart-strategy", choices=sorted(RESTART), default="tda",
                   help="the online strategy of the restart run (default tda, one view; tent needs batches of 2+ "
                        "on a BatchNorm tower)")
    p.add_argument("--baseline", type=int, default=90, help="in-process batch-1 calls (the reference)")
    args = start(p, quick={"requests": [12, 24, 48], "restart_requests": 48, "baseline": 12, "rounds": 2})
    counts = dict(zip(LEVELS, args.requests))
    n_load = sum(counts.values())
    data = images(n_load + args.restart_requests + args.baseline, seed=0)
    load, restart_data, ref_data = data[:n_load], data[n_load:n_load + args.restart_requests], data[-args.baseline:]
    ref = InProcess()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        log = Path(tmp) / "server.log"
        rows = load_levels(load, counts, args.rounds, ref, ref_data, args.threads, log)
        base = {"batch1_rps": ref.calls / ref.wall, "batch1_requests": ref.calls,
                "batch32_images_per_s": ref.batch32(ref_data)}
        for r in rows:
            r["vs_c1"] = ratio(r["rps"], rows[0]["rps"])
            r["vs_in_process"] = ratio(r["rps"], base["batch1_rps"])
        print(f"in process: batch 1 {base['batch1_rps']:.1f} req/s, batch 32 {base['batch32_images_per_s']:.1f} "
              f"img/s (x{base['batch32_images_per_s'] / base['batch1_rps']:.2f}: the model's own batching gain)")
        print(table(rows, COLUMNS))
        restart = asyncio.run(restart_run(restart_data, args.restart_strategy, 32, args.threads,
                                          Path(tmp), log))
    restart["ok"] = (restart["lost"] == 0 and restart["adapted_without_answer"] == 0 and restart["resumed"]
                     and restart["positions_contiguous"] and restart["answered"] == args.restart_requests
                     and restart["resumed_samples"] == restart["saved_samples_at_exit"]
                     and restart["probe_class_matches"] and restart["probe_served_vs_file"] < 1e-5)
    print("restart:", restart)
    finish(args, {"in_process": base, "levels": rows, "restart": restart, "bench_wall_s": time.monotonic() - t0,
                  "acceptance": {"c32_over_c1": rows[-1]["vs_c1"], "target": 3.0,
                                 "model_batch32_over_batch1": base["batch32_images_per_s"] / base["batch1_rps"],
                                 "errors": sum(sum(r["errors"].values()) for r in rows),
                                 "restart_ok": restart["ok"]}},
           model=ref.adapter.model)


if __name__ == "__main__":
    try:
        main()
    finally:
        for server in STARTED:
            if server.proc.poll() is None:
                server.proc.kill()
