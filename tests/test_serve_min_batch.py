"""`ctta serve` with a strategy that needs several images per model call (`Strategy.min_batch`): TENT on a BatchNorm
image tower (the tiny ``ModifiedResNet`` of ``tests._resnet``), which normalises with each batch's own statistics.

A lone request on a fresh server is a plain 422; once images have been answered, a lone request is padded with the
most recent of them, predicted without adaptation (the state is bit-for-bit unchanged) and answered with its own
row, which is checked against ``predict`` on [the request's image, the padding image] computed by hand on a
replica adapter. Calls that are large enough, and strategies with ``min_batch`` 1, are served as before.
"""
from __future__ import annotations

import io

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="the serve extra is not installed (TestClient needs httpx)")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
pytest.importorskip("multipart", reason="the serve extra is not installed")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from ctta import LabelSpace, Strategy, wrap  # noqa: E402
from ctta.predictions import prepare_images  # noqa: E402
from ctta.serve import ServeOptions, create_app  # noqa: E402
from ctta.serve.batcher import Job  # noqa: E402
from ctta.serve.service import Payload, Service  # noqa: E402
from ctta.strategies.tent import Tent  # noqa: E402
from ctta.strategies.zeroshot import ZeroShot  # noqa: E402
from tests._resnet import RESNET_SIZE, make_resnet_clip  # noqa: E402
from tests._tta_stub import same_state  # noqa: E402
from tests.conftest import make_tiny_clip  # noqa: E402

CLASSES = [f"class {i}" for i in range(6)]


def png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (RESNET_SIZE, RESNET_SIZE, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def tensor_of(data: bytes, clip) -> torch.Tensor:
    return prepare_images(clip, [Image.open(io.BytesIO(data))])


def resnet_adapter(strategy: Strategy | None = None):
    return wrap(make_resnet_clip(0), strategy or Tent(lr=5e-2), LabelSpace(CLASSES), reset="never")


def state(service: Service) -> dict:
    s = service.adapter.state_dict()
    return {"model": s["model"], "strategy": s["strategy"]}


def post(c: TestClient, data: bytes, query: str = "?top_k=6"):
    return c.post(f"/predict{query}", content=data, headers={"Content-Type": "image/png"})


def probs_by_class(answer: dict) -> torch.Tensor:
    """The answer's full distribution (top_k = every class) in class order."""
    p = {t["class"]: t["prob"] for t in answer["top_k"]}
    return torch.tensor([p[c] for c in CLASSES])


def padded_metric(c: TestClient) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("ctta_padded_calls_total "):
            return float(line.split()[1])
    raise AssertionError("ctta_padded_calls_total is not exported")


def test_min_batch_is_2_for_tent_on_a_batchnorm_tower_and_1_otherwise():
    assert Strategy().min_batch == 1 and Tent().min_batch == 1  # before setup: no batch-statistics path yet
    on_resnet = resnet_adapter(Tent()).strategy
    assert on_resnet.batch_norms and on_resnet.min_batch == 2
    on_vit = wrap(make_tiny_clip(0), Tent(), LabelSpace(CLASSES)).strategy
    assert on_vit.batch_norms == [] and on_vit.min_batch == 1
    assert resnet_adapter(ZeroShot()).strategy.min_batch == 1  # running statistics: any batch size
    with pytest.raises(ValueError, match="batches of at least 2 images"):  # TENT's own refusal is unchanged
        on_resnet.predict(torch.rand(1, 3, RESNET_SIZE, RESNET_SIZE), LabelSpace(CLASSES))


def test_tent_on_a_resnet_tower_refuses_then_pads_a_lone_request_without_adapting():
    service = Service(resnet_adapter(), ServeOptions())
    ref = resnet_adapter()  # a replica, driven by hand to the same state
    lone, pair, lone2 = png(1), [png(2), png(3)], png(4)
    with TestClient(create_app(service)) as c:
        anchor = state(service)
        # 1. nothing answered yet: nothing to pad with -> a plain 422, the state untouched
        r = post(c, lone)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["kind"] == "batch_too_small"
        assert "Tent on a BatchNorm image tower" in err["message"]
        assert "needs at least 2 images per model call" in err["message"]
        assert "send 2 or more images in one request (the first request), or send concurrent requests" \
            in err["message"]
        assert same_state(state(service), anchor) and service.adapter.samples == 0
        # 2. a 2-image request: adapted on as before, no padding
        files = [("image", (f"{k}.png", d, "image/png")) for k, d in enumerate(pair)]
        r = c.post("/predict?top_k=6", files=files)
        assert r.status_code == 200, r.text
        body = r.json()
        x_pair = torch.cat([tensor_of(d, ref.model) for d in pair])
        expected_pair = ref(x_pair)
        assert body["adapted"] is True and body["batch"]["padding"] == 0 and body["position"] == 0
        for answer, probs in zip(body["predictions"], expected_pair.probs):
            assert probs_by_class(answer).tolist() == pytest.approx(probs.tolist(), abs=1e-6)
        moved = state(service)
        assert not same_state(moved, anchor) and same_state(moved, {k: v for k, v in ref.state_dict().items()
                                                                    if k in ("model", "strategy")})
        # 3. a lone request: padded with the most recent answered image (the pair's second), predicted only
        r = post(c, lone)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapted"] is False and body["position"] is None
        assert body["batch"]["padding"] == 1 and body["batch"]["images"] == 1 and len(body["predictions"]) == 1
        x = tensor_of(lone, ref.model)
        expected = ref.predict(torch.cat([x, x_pair[1:]]))  # by hand: [the lone image, the padding image]
        wrong = ref.predict(torch.cat([x, x_pair[:1]]))     # padded with the older image instead
        got = probs_by_class(body["predictions"][0])
        assert got.tolist() == pytest.approx(expected.probs[0].tolist(), abs=1e-6)
        assert (wrong.probs[0] - expected.probs[0]).abs().max() > 1e-3  # the check can tell the padding apart
        assert body["predictions"][0]["entropy"] == pytest.approx(float(expected.entropy[0]), abs=1e-5)
        assert body["predictions"][0]["class"] == expected.classnames[0]
        assert same_state(state(service), moved)  # no adaptation step saw the padded call
        assert service.adapter.samples == 2 and service.padded_calls == 1
        assert c.get("/healthz").json()["padded_calls"] == 1 and padded_metric(c) == 1.0
        # 4. the next lone request is padded with the lone image just answered (a ring buffer of answered images)
        r = post(c, lone2)
        assert r.status_code == 200 and r.json()["batch"]["padding"] == 1
        expected2 = ref.predict(torch.cat([tensor_of(lone2, ref.model), x]))
        assert probs_by_class(r.json()["predictions"][0]).tolist() == pytest.approx(
            expected2.probs[0].tolist(), abs=1e-6)
        assert same_state(state(service), moved) and padded_metric(c) == 2.0


def test_two_lone_requests_gathered_in_one_call_are_adapted_on_as_before():
    service = Service(resnet_adapter(), ServeOptions())
    ref = resnet_adapter()
    a, b = tensor_of(png(5), ref.model), tensor_of(png(6), ref.model)
    jobs = [Job(0, 1, (True, None), Payload(a, 6)), Job(1, 1, (True, None), Payload(b, 6))]
    answers = service._run_batch(jobs)  # the model thread's call for one micro-batch of two requests
    expected = ref(torch.cat([a, b]))
    assert [x["adapted"] for x in answers] == [True, True] and [x["position"] for x in answers] == [0, 1]
    assert all(x["batch"]["padding"] == 0 and x["batch"]["images"] == 2 for x in answers)
    for answer, probs in zip(answers, expected.probs):
        assert probs_by_class(answer["predictions"][0]).tolist() == pytest.approx(probs.tolist(), abs=1e-6)
    assert service.padded_calls == 0 and service.adapter.samples == 2


def test_a_strategy_with_min_batch_1_serves_a_lone_request_unpadded():
    service = Service(resnet_adapter(ZeroShot()), ServeOptions())
    ref = resnet_adapter(ZeroShot())
    with TestClient(create_app(service)) as c:
        r = post(c, png(1))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["batch"]["padding"] == 0 and body["batch"]["images"] == 1
        expected = ref(tensor_of(png(1), ref.model))
        assert probs_by_class(body["predictions"][0]).tolist() == pytest.approx(expected.probs[0].tolist(), abs=1e-6)
        assert service.padded_calls == 0 and padded_metric(c) == 0.0 and service._recent is None
