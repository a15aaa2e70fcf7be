"""`ctta serve`: every endpoint, every refused input (4xx/503, state unchanged), micro-batch ordering under
concurrency, persistence across a restart, the batcher on its own, and the scripts' plain errors.

Through FastAPI's TestClient (the app's lifespan runs: start-up, drain and final snapshot) on the tiny random CLIP
with TENT, whose every adapted sample moves the state, so a lost, repeated or reordered sample would show.
"""
from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="the serve extra is not installed (TestClient needs httpx)")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
pytest.importorskip("multipart", reason="the serve extra is not installed")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from ctta import LabelSpace, wrap  # noqa: E402
from ctta.predictions import prepare_images  # noqa: E402
from ctta.serve import ServeError, ServeOptions, StateError, create_app  # noqa: E402
from ctta.serve.batcher import MicroBatcher  # noqa: E402
from ctta.serve.inputs import sniff  # noqa: E402
from ctta.serve.service import Service  # noqa: E402
from ctta.strategies.tent import Tent  # noqa: E402
from tests._tta_stub import same_state  # noqa: E402
from tests.conftest import make_tiny_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class {i}" for i in range(6)]


def png(seed: int, size: int = 16, fmt: str = "PNG") -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def tensor_of(data: bytes, clip) -> torch.Tensor:
    return prepare_images(clip, [Image.open(io.BytesIO(data))])


def make_adapter(reset="never", strategy=None):
    return wrap(make_tiny_clip(0), strategy or Tent(lr=5e-2), LabelSpace(CLASSES), reset=reset)


def client(adapter=None, **options) -> tuple[TestClient, Service]:
    service = Service(adapter or make_adapter(), ServeOptions(**options))
    return TestClient(create_app(service)), service


def state(service: Service) -> dict:
    s = service.adapter.state_dict()
    return {"model": s["model"], "strategy": s["strategy"]}


def post(c: TestClient, data: bytes, query: str = "", ctype: str = "image/png"):
    return c.post(f"/predict{query}", content=data, headers={"Content-Type": ctype})


# --------------------------------------------------------------------------------------------- endpoints
def test_predict_one_image_matches_the_adapter_in_process_and_adapts():
    img = png(1)
    ref = make_adapter()
    expected = ref(tensor_of(img, ref.model))  # the same adapter in process: logits before its first update
    with client(top_k=3)[0] as c:
        r = post(c, img)
        assert r.status_code == 200, r.text
        body = r.json()
        (p,) = body["predictions"]
        assert p["class"] == expected.classnames[0] and p["index"] == CLASSES.index(p["class"])
        assert p["entropy"] == pytest.approx(float(expected.entropy[0]), abs=1e-5)
        top = expected.probs[0].topk(3)
        assert [t["class"] for t in p["top_k"]] == [CLASSES[i] for i in top.indices.tolist()]
        assert [t["prob"] for t in p["top_k"]] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert p["confidence"] == p["top_k"][0]["prob"]
        assert body["adapted"] is True and body["reset"] is False and body["skipped_updates"] == 0
        assert body["position"] == 0 and body["seq"] == 0
        # the second call sees the adapted state: identical to the in-process adapter's second call
        img2 = png(2)
        second = ref(tensor_of(img2, ref.model))
        p2 = post(c, img2, "?top_k=6").json()
        assert [t["prob"] for t in p2["predictions"][0]["top_k"]] == pytest.approx(
            second.probs[0].sort(descending=True).values.tolist(), abs=1e-5)
        assert p2["position"] == 1


def test_multipart_images_keep_their_order_and_class_subset_renormalises():
    imgs = [png(s) for s in (3, 4, 5)]
    ref = make_adapter()
    x = torch.cat([tensor_of(i, ref.model) for i in imgs])
    expected = ref(x, ["class 4", "class 1"])
    with client()[0] as c:
        files = [("image", (f"{k}.png", d, "image/png")) for k, d in enumerate(imgs)]
        r = c.post("/predict?classes=class%204&classes=class%201", files=files)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["class"] for p in preds] == expected.classnames
        for p, probs in zip(preds, expected.probs):
            assert sum(t["prob"] for t in p["top_k"]) == pytest.approx(1.0, abs=1e-5)  # both classes, renormalised
            assert {t["class"] for t in p["top_k"]} == {"class 4", "class 1"}
            assert p["top_k"][0]["prob"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert r.json()["batch"]["images"] == 3


def test_adapt_false_pause_resume_reset_leave_or_restore_the_state():
    c, service = client()
    with c:
        anchor = state(service)
        r = post(c, png(1), "?adapt=false")
        assert r.json()["adapted"] is False and r.json()["position"] is None
        assert same_state(state(service), anchor)
        post(c, png(1))
        moved = state(service)
        assert not same_state(moved, anchor)
        assert c.post("/pause").json() == {"paused": True}
        assert c.post("/pause").json() == {"paused": True}  # idempotent
        r = post(c, png(2))
        assert r.json()["adapted"] is False and same_state(state(service), moved)
        assert c.get("/healthz").json()["paused"] is True
        assert c.post("/resume").json() == {"paused": False}
        assert post(c, png(2)).json()["adapted"] is True and not same_state(state(service), moved)
        r = c.post("/reset")
        assert r.status_code == 200 and r.json()["reset"] is True
        assert same_state(state(service), anchor)


def test_health_ready_classes_and_metrics():
    c, service = client()
    with c:
        h = c.get("/healthz").json()
        assert h["status"] == "ok" and h["strategy"] == "Tent" and h["classes"] == 6 and h["samples"] == 0
        assert c.get("/readyz").json() == {"ready": True, "state": "ready"}
        assert c.get("/classes").json() == {"classes": CLASSES}
        post(c, png(1))
        post(c, b"not an image")
        c.post("/reset")
        text = c.get("/metrics").text
        assert c.get("/metrics").headers["content-type"].startswith("text/plain")
        for line in ('ctta_requests_total{endpoint="/predict",status="200"} 1.0',
                     'ctta_requests_total{endpoint="/predict",status="415"} 1.0',
                     'ctta_errors_total{kind="unsupported_format"} 1.0', 'ctta_samples_total{adapted="true"} 1.0',
                     "ctta_resets_total 1.0", "ctta_model_call_seconds_count{adapt=\"true\"} 1.0",
                     "ctta_batch_images_count 1.0", "ctta_adapted_samples 1.0", "ctta_skipped_updates_total 0.0"):
            assert line in text, line
        entropy = next(float(x.split()[1]) for x in text.splitlines() if x.startswith("ctta_window_entropy "))
        assert 0 < entropy <= torch.log(torch.tensor(6.0)).item()
    assert service.draining and not service.ready  # after the lifespan's shutdown


def test_snapshot_is_refused_without_a_state_path_and_loads_back_with_one(tmp_path):
    with client()[0] as c:
        r = c.post("/snapshot")
        assert r.status_code == 409 and r.json()["error"]["kind"] == "no_state_path"
    path = tmp_path / "state.pt"
    c, service = client(state_path=str(path))
    with c:
        post(c, png(1))
        r = c.post("/snapshot").json()
        assert r["path"] == str(path) and r["samples"] == 1 and path.stat().st_size == r["bytes"]
        fresh = make_adapter()
        fresh.load(path)
        assert same_state({"model": fresh.state_dict()["model"], "strategy": fresh.state_dict()["strategy"]},
                          state(service))


# --------------------------------------------------------------------------------------------- limits
def _truncated() -> bytes:
    data = png(7, size=64)
    return data[: len(data) // 2]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="GIF")
    return buf.getvalue()


def _strip(w: int = 600, h: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, format="PNG")
    return buf.getvalue()


BAD = {  # name: (query, body, content type, options, status, kind)
    # 600 pixels as sent, 16 x 9600 once its shorter side is the model's 16 (a 1 x 300000 strip took 5 GB)
    "thin strip": ("", _strip(), "image/png", {"max_pixels": 100_000}, 413, "too_many_pixels"),
    "unicode digit top_k": ("?top_k=%C2%B2", png(1), "image/png", {}, 400, "bad_request"),  # was a text 500
    "repeated adapt": ("?adapt=false&adapt=true", png(1), "image/png", {}, 400, "bad_request"),
    "an empty class name": ("?classes=&classes=class%201", png(1), "image/png", {}, 400, "empty_classes"),
    "body too large": ("", png(1, size=64), "image/png", {"max_body_bytes": 2000}, 413, "body_too_large"),
    "too many pixels": ("", png(1, size=40), "image/png", {"max_pixels": 32 * 32}, 413, "too_many_pixels"),
    "decode error": ("", _truncated(), "image/png", {}, 400, "decode_error"),
    "unsupported format (GIF)": ("", _gif(), "image/gif", {}, 415, "unsupported_format"),
    "not an image": ("", b"hello world", "application/octet-stream", {}, 415, "unsupported_format"),
    "empty body": ("", b"", "image/png", {}, 400, "empty_body"),
    "JSON body": ("", b'{"image": 1}', "application/json", {}, 415, "unsupported_media_type"),
    "empty class subset": ("?classes=", png(1), "image/png", {}, 400, "empty_classes"),
    "unknown class": ("?classes=class%201&classes=dog", png(1), "image/png", {}, 400, "unknown_class"),
    "duplicate class": ("?classes=class%201&classes=class%201", png(1), "image/png", {}, 400, "duplicate_class"),
    "bad top_k": ("?top_k=0", png(1), "image/png", {}, 400, "bad_request"),
    "bad adapt": ("?adapt=maybe", png(1), "image/png", {}, 400, "bad_request"),
    "unknown parameter": ("?clases=class%201", png(1), "image/png", {}, 400, "bad_request"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_input_gets_its_4xx_and_changes_nothing(name):
    query, body, ctype, options, status, kind = BAD[name]
    c, service = client(**options)
    probe = png(99)
    with c:
        post(c, png(1))  # an adapted state, so that "unchanged" is not trivially the anchor
        before, counters = state(service), (service.adapter.samples, service.adapter.calls)
        valid = post(c, probe, "?adapt=false").json()["predictions"]
        r = post(c, body, query, ctype)
        assert r.status_code == status, r.text
        assert r.json()["error"]["kind"] == kind and r.json()["error"]["message"]
        assert same_state(state(service), before) and (service.adapter.samples, service.adapter.calls) == counters
        assert post(c, probe, "?adapt=false").json()["predictions"] == valid
        assert c.get("/healthz").json()["status"] == "ok"
        assert f'ctta_errors_total{{kind="{kind}"}} 1.0' in c.get("/metrics").text


def test_too_many_images_in_one_multipart_request_is_413():
    c, service = client(max_images=2, max_queue=4)
    with c:
        files = [("image", (f"{k}.png", png(k), "image/png")) for k in range(3)]
        r = c.post("/predict", files=files)
        assert r.status_code == 413 and r.json()["error"]["kind"] == "too_many_images", r.text
        r = c.post("/predict", files=files[:1], data={"classes": "class 1"})
        assert r.status_code == 400 and r.json()["error"]["kind"] == "bad_multipart"
        assert service.adapter.samples == 0


def test_a_request_has_a_pixel_budget_and_a_truncated_multipart_body_is_named():
    c, service = client(max_pixels=32 * 32, max_request_pixels=2 * 32 * 32)
    with c:
        files = [("image", (f"{k}.png", png(k, size=32), "image/png")) for k in range(3)]
        r = c.post("/predict", files=files)  # each image within max_pixels, the three over the request's budget
        assert r.status_code == 413 and "serve.max_request_pixels" in r.json()["error"]["message"], r.text
        body = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + png(1)[:40]
        r = c.post("/predict", content=body, headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        assert r.status_code == 400 and r.json()["error"]["kind"] == "bad_multipart", r.text
        assert "before its closing boundary" in r.json()["error"]["message"]
        assert service.adapter.samples == 0


def test_routing_errors_use_the_json_error_shape_and_there_are_no_docs_pages():
    with client()[0] as c:
        for method, path, status, kind in (("get", "/nope", 404, "not_found"), ("get", "/predict", 405,
                                           "method_not_allowed"), ("get", "/docs", 404, "not_found"),
                                           ("get", "/openapi.json", 404, "not_found")):
            r = getattr(c, method)(path)
            assert r.status_code == status and r.json()["error"]["kind"] == kind, (path, r.text)


def test_a_state_path_that_cannot_be_written_is_refused_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StateError, match="cannot write in .*the adapted state could never be saved"):
        Service(make_adapter(), ServeOptions(state_path=str(blocker / "sub" / "state.pt")))
    with pytest.raises(ValueError, match="needs 2 images per model call, but serve.max_batch is 1"):
        from tests._resnet import make_resnet_clip
        tent = wrap(make_resnet_clip(), Tent(), LabelSpace(CLASSES))
        Service(tent, ServeOptions(max_batch=1))


def test_a_final_save_that_fails_is_said_and_not_a_clean_exit(tmp_path):
    c, service = client(state_path=str(tmp_path / "state" / "s.pt"))
    with c:
        post(c, png(1))
        (tmp_path / "state").rmdir()
        (tmp_path / "state").write_text("the folder was replaced by a file")  # the save at shutdown must fail
    assert service.save_error and "could not be written" in service.save_error


class GatedTent(Tent):
    """TENT whose adaptation waits for a gate: holds the model thread so that the queue can fill."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gate, self.entered = threading.Event(), threading.Event()

    def adapt(self, images, space):
        self.entered.set()
        self.gate.wait(10)
        return super().adapt(images, space)


def test_a_full_queue_answers_503_and_the_refused_request_is_not_adapted_on():
    strategy = GatedTent(lr=5e-2)
    c, service = client(make_adapter(strategy=strategy), max_queue=2, max_images=2, max_wait_ms=0)
    with c, ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, c, png(1))
        assert strategy.entered.wait(10)  # the model thread is busy with the first request
        queued = [pool.submit(post, c, png(k)) for k in (2, 3)]
        deadline = time.monotonic() + 10
        while service.batcher.queued_images < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = post(c, png(4))
        assert r.status_code == 503 and r.json()["error"]["kind"] == "queue_full" and r.headers["retry-after"]
        strategy.gate.set()
        assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        assert service.adapter.samples == 3  # the refused image never reached the strategy


class FailingTent(Tent):
    """TENT that fails on an all-white image (a strategy bug, as far as the server can tell)."""

    def adapt(self, images, space):
        if bool((images > 0.99).all()):
            raise RuntimeError("white image")
        return super().adapt(images, space)


def test_a_failing_model_call_answers_a_json_500_and_the_server_carries_on():
    c, service = client(make_adapter(strategy=FailingTent(lr=5e-2)))
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "white").save(buf, format="PNG")
    with c:
        r = post(c, buf.getvalue())
        assert r.status_code == 500 and r.json()["error"]["kind"] == "model_error"
        assert "white image" in r.json()["error"]["message"]
        assert post(c, png(1)).status_code == 200 and c.get("/healthz").json()["status"] == "ok"
        assert service.adapter.samples == 1


# --------------------------------------------------------------------------------------------- ordering
class RecordingTent(Tent):
    """TENT that records the first pixel of every image it adapts on, in the order it sees them."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[float] = []

    def adapt(self, images, space):
        self.seen += images[:, 0, 0, 0].tolist()
        return super().adapt(images, space)


def test_concurrent_requests_are_batched_in_queue_order_and_each_gets_its_own_rows():
    strategy = RecordingTent(lr=5e-2)
    c, service = client(make_adapter(strategy=strategy), max_batch=8, max_wait_ms=100)
    imgs = [png(100 + k) for k in range(24)]
    with c, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda d: post(c, d).json(), imgs))
    seqs = sorted(a["seq"] for a in answers)
    assert seqs == list(range(24))
    by_seq = sorted(zip(answers, imgs), key=lambda t: t[0]["seq"])
    assert [a["position"] for a, _ in by_seq] == list(range(24))  # stream order == queue order
    clip = service.adapter.model
    firsts = [float(tensor_of(d, clip)[0, 0, 0, 0]) for _, d in by_seq]
    assert strategy.seen == pytest.approx(firsts)  # the strategy saw the images in exactly that order
    assert max(a["batch"]["requests"] for a in answers) > 1, "no micro-batch formed"
    # replay the same batches in process: every response carries its own rows of its own call
    ref = make_adapter()
    batches: dict[int, list] = {}
    for a, d in by_seq:
        batches.setdefault(a["batch"]["id"], []).append((a, d))
    for bid in sorted(batches):
        out = ref(torch.cat([tensor_of(d, ref.model) for _, d in batches[bid]]))
        for row, (a, _) in enumerate(batches[bid]):
            assert a["predictions"][0]["class"] == out.classnames[row]
            assert a["predictions"][0]["confidence"] == pytest.approx(float(out.probs[row].max()), abs=1e-5)


def test_a_lone_request_does_not_wait_for_a_batch_that_is_not_coming():
    with client(max_wait_ms=1000)[0] as c:
        post(c, png(0))
        t = time.monotonic()
        assert post(c, png(1)).status_code == 200
        assert time.monotonic() - t < 0.9  # nobody else was arriving: the batch left at once, not after 1 s


def test_an_episodic_adapter_serves_each_request_in_its_own_call():
    c, service = client(make_adapter(reset="episodic"), max_batch=8, max_wait_ms=50)
    with c, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda k: post(c, png(k)).json(), range(8)))
    assert not service.batcher.merge and all(a["batch"]["requests"] == 1 and a["reset"] for a in answers)
    ref = make_adapter(reset="episodic")  # stateless: the answer depends on the request alone
    for k, a in enumerate(answers):
        assert a["predictions"][0]["confidence"] == pytest.approx(
            float(ref(tensor_of(png(k), ref.model)).probs.max()), abs=1e-5)


def test_batcher_stops_a_batch_at_a_control_job_or_another_key_and_respects_max_batch():
    calls: list[list[tuple[int, object]]] = []

    def run(jobs):
        calls.append([(j.seq, j.key) for j in jobs])
        return [j.seq for j in jobs]

    async def scenario():
        b = MicroBatcher(run, max_batch=3, max_wait_ms=0, max_queue=100)
        futs = [b.submit(1, "a", None), b.submit(1, "a", None), b.control(lambda: "ctl"), b.submit(1, "a", None),
                b.submit(1, "b", None), b.submit(1, "b", None), b.submit(1, "b", None), b.submit(1, "b", None)]
        b.start()
        out = await asyncio.gather(*futs)
        await b.close()
        with pytest.raises(ServeError, match="shutting down"):
            b.submit(1, "a", None)
        b.executor.shutdown()
        return out

    assert asyncio.run(scenario()) == [0, 1, "ctl", 3, 4, 5, 6, 7]
    assert [[s for s, _ in c] for c in calls] == [[0, 1], [3], [4, 5, 6], [7]]


# --------------------------------------------------------------------------------------------- persistence
def test_restart_resumes_the_adapted_state_and_refuses_a_foreign_or_corrupt_file(tmp_path):
    path = tmp_path / "state.pt"
    c, first = client(state_path=str(path))
    with c:
        for k in range(3):
            post(c, png(k))
        probe = post(c, png(50), "?adapt=false").json()["predictions"]
    final = state(first)  # the lifespan's shutdown wrote it
    c2, second = client(state_path=str(path))
    with c2:
        h = c2.get("/healthz").json()
        assert h["resumed"] is True and h["samples"] == 3 and h["calls"] == 3
        assert same_state(state(second), final)
        assert post(c2, png(50), "?adapt=false").json()["predictions"] == probe
        assert post(c2, png(51)).json()["position"] == 3  # the stream goes on where it stopped
    other = wrap(make_tiny_clip(0), Tent(lr=5e-2), LabelSpace(["x", "y"]))
    with pytest.raises(StateError, match="classnames"):
        Service(other, ServeOptions(state_path=str(path)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StateError, match="corrupt"):
        Service(make_adapter(), ServeOptions(state_path=str(path)))


def test_periodic_snapshots_follow_the_state(tmp_path):
    path = tmp_path / "state.pt"
    c, service = client(state_path=str(path), snapshot_every_s=0.05)
    with c:
        time.sleep(0.2)
        assert not path.exists()  # nothing moved: nothing written
        post(c, png(1))
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.exists()
        assert 'ctta_snapshots_total' in c.get("/metrics").text


def test_options_are_checked_with_the_key_named():
    with pytest.raises(ValueError, match="serve.max_batch"):
        ServeOptions(max_batch=0)
    with pytest.raises(ValueError, match="needs serve.state_path"):
        ServeOptions(snapshot_every_s=5)
    with pytest.raises(ValueError, match="serve.drain_timeout_s"):
        ServeOptions(drain_timeout_s=0)
    with pytest.raises(ValueError, match="could never be queued"):
        ServeOptions(max_images=64, max_batch=64, max_queue=32)
    with pytest.raises(ValueError, match="unknown serve option"):
        ServeOptions.from_dict({"max_bacth": 4})
    # a request is at most one model call (max_batch 2 took a call of 8 images); NaN or empty values are refused
    assert ServeOptions(max_batch=4).max_images == 4
    with pytest.raises(ValueError, match=r"serve.max_images \(8\) exceeds serve.max_batch \(2\)"):
        ServeOptions(max_batch=2, max_images=8)
    for name in ("drain_timeout_s", "read_timeout_s"):
        with pytest.raises(ValueError, match=f"serve.{name} must be a positive, finite number"):
            ServeOptions(**{name: float("nan")})
    with pytest.raises(ValueError, match="serve.snapshot_every_s must be a positive, finite number"):
        ServeOptions(state_path="s.pt", snapshot_every_s=float("nan"))
    with pytest.raises(ValueError, match="serve.state_path is empty"):
        ServeOptions(state_path="")
    assert sniff(png(1)) == "PNG" and sniff(png(1, fmt="JPEG")) == "JPEG" and sniff(png(1, fmt="WEBP")) == "WEBP"


# --------------------------------------------------------------------------------------------- command line
def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _serve_script():
    """scripts/serve.py as a module (its siblings configcheck.py and run.py import from scripts/)."""
    import importlib.util
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("serve_script", ROOT / "scripts" / "serve.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def test_serve_config_composes_and_set_up_mistakes_are_reported_plainly(tmp_path, capsys):
    from hydra import compose, initialize_config_dir
    script = _serve_script()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("serve", overrides=["strategy=tent", "classes=[red star,blue circle]", "reset=episodic"])
        script._check_top_level(cfg)
        assert script._classes(cfg) == ["red star", "blue circle"] and cfg.strategy.lr == 1e-3
        assert ServeOptions.from_dict(dict(cfg.serve)) == ServeOptions()  # the yaml's defaults are the class's
        names = tmp_path / "classes.txt"
        names.write_text("# world\nred star\n\nblue circle\nred star\n")
        dup = compose("serve", overrides=[f"classes_file={names}"])
        with pytest.raises(script.SetupError, match="names a class twice"):
            script._classes(dup)
        with pytest.raises(script.SetupError, match="expected int"):
            script._check_top_level(compose("serve", overrides=["port=abc"]))
    with pytest.raises(SystemExit) as e:
        script._report(script.SetupError(f"classes_file={tmp_path}/none.txt does not exist", "give a file"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: classes_file=") and "hint: give a file" in err
    with pytest.raises(SystemExit):
        script._report(StateError("refusing the state file x: corrupt"))
    assert "hint: move the file away" in capsys.readouterr().err
    assert script._report(RuntimeError("a bug")) is None  # not the user's: keeps its traceback


@pytest.mark.slow
def test_serve_command_reports_a_bad_value_plainly_before_torch(tmp_path):
    """``python -m ctta.serve`` starts scripts/serve.py (the launcher), which refuses a missing classes file with
    exit code 2, an error and a hint, and no traceback."""
    r = subprocess.run([sys.executable, "-m", "ctta.serve", f"classes_file={tmp_path}/none.txt"],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: classes_file=" in r.stderr and "does not exist" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "loading model" not in r.stderr


def test_launcher_finds_the_script_and_the_core_of_serve_needs_no_web_stack(capsys):
    import ast
    from ctta.serve import launch
    assert launch.script() == ROOT / "scripts" / "serve.py"
    assert launch.main(["run"]) == 2 and "usage: ctta serve" in capsys.readouterr().err
    assert launch.main(["--help"]) == 0
    web = {"fastapi", "starlette", "uvicorn", "prometheus_client", "multipart", "hydra", "omegaconf"}
    for name in ("__init__", "options", "launch", "__main__"):  # importable without the extra (ServeOptions)
        tree = ast.parse((ROOT / "ctta" / "serve" / f"{name}.py").read_text())
        top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        top += [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
        assert not {m.split(".")[0] for m in top} & web, (name, top)


@pytest.mark.slow
def test_real_server_drains_on_sigterm_writes_the_state_and_resumes(tmp_path):
    """The real server (scripts/serve.py under uvicorn): SIGTERM with requests in flight; every answered request is
    in the state written at exit, and a restart resumes it. (A foreign state file is refused with exit code 2.)"""
    import httpx
    state_path = tmp_path / "state.pt"
    # TDA with one view: stateful at any batch size on any tower (TENT refuses lone images on a BatchNorm tower)
    args = [sys.executable, str(ROOT / "scripts/serve.py"), "port=8791", "threads=1", "strategy=tda",
            "strategy.n_views=0", "strategy.augmix=false", f"serve.state_path={state_path}"]

    def start():
        p = subprocess.Popen(args, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get("http://127.0.0.1:8791/readyz").status_code == 200:
                    return p
            except httpx.TransportError:
                time.sleep(0.2)
        p.kill()
        raise AssertionError(p.stdout.read())

    p = start()
    ok = 0
    with ThreadPoolExecutor(4) as pool:
        def one(k):
            try:
                r = httpx.post("http://127.0.0.1:8791/predict", content=png(k, size=32),
                               headers={"Content-Type": "image/png"}, timeout=30)
                return r.status_code
            except httpx.TransportError:
                return None
        futs = [pool.submit(one, k) for k in range(40)]
        time.sleep(0.5)
        p.send_signal(15)
        codes = [f.result() for f in futs]
    out, _ = p.communicate(timeout=60)
    ok = codes.count(200)
    assert ok > 0 and state_path.exists(), out
    assert "adapted state written" in out
    p = start()
    try:
        assert httpx.get("http://127.0.0.1:8791/healthz").json()["samples"] == ok
    finally:
        p.send_signal(15)
        p.communicate(timeout=60)
    r = subprocess.run(args[:4] + ["strategy=zeroshot", f"serve.state_path={state_path}"], capture_output=True,
                       text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "refusing the state file" in r.stderr and "Traceback" not in r.stderr


def test_a_view_strategy_behind_the_server_gets_whole_images_as_in_process():
    """TPT, TDA, DPE... crop their views from the whole image: the server hands it over (shrunk above
    source_side) as `ctta.wrap` does for PIL images, and a request of mixed sizes is answered in order."""
    from tests.test_online import _Sources

    def rect(seed: int, w: int, h: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        buf = io.BytesIO()
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(buf, "PNG")
        return buf.getvalue()

    imgs = [rect(1, 30, 40), rect(2, 50, 20), rect(3, 30, 40)]
    ref_strategy = _Sources()
    ref = wrap(make_tiny_clip(0), ref_strategy, LabelSpace(CLASSES), source_side=24)
    expected = ref([Image.open(io.BytesIO(d)) for d in imgs])
    served = _Sources()
    with client(wrap(make_tiny_clip(0), served, LabelSpace(CLASSES), source_side=24), top_k=6)[0] as c:
        files = [("image", (f"{k}.png", d, "image/png")) for k, d in enumerate(imgs)]
        r = c.post("/predict", files=files)
        assert r.status_code == 200, r.text
    assert served.seen == ref_strategy.seen == [(1, 3, 32, 24), (1, 3, 20, 50), (1, 3, 32, 24)]
    for p, probs in zip(r.json()["predictions"], expected.probs):
        assert [t["prob"] for t in p["top_k"]] == pytest.approx(probs.sort(descending=True).values.tolist(),
                                                                  abs=1e-6)
