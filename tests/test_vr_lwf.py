"""VR-LwF, LwF and WiSE-FT interpolation: distillation values by hand, teacher freezing, vocabulary determinism,
once-per-task caching, interpolation math."""
from __future__ import annotations

import math

import pytest
import torch

from ctta import AccuracyMatrix, run
from ctta.losses import distillation
from ctta.merging import interpolate_
from ctta.strategies.finetune import Finetune
from ctta.distillation import Distillation, lwf_terms
from ctta.strategies.lwf import LwF
from ctta.strategies.vr_lwf import VRLwF, random_vocabulary, special_tokens
from tests.conftest import make_tiny_clip

T_LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
S_LOGITS = [[0.5, 0.0, 1.0], [2.0, 1.0, 0.0]]


def hand_distillation(t, s, T):
    """CE(s/T, softmax(t/T))·T², mean over rows, written out with math.exp."""
    total = 0.0
    for tr, sr in zip(t, s):
        zt = sum(math.exp(x / T) for x in tr)
        log_zs = math.log(sum(math.exp(x / T) for x in sr))
        total -= sum(math.exp(a / T) / zt * (b / T - log_zs) for a, b in zip(tr, sr))
    return total / len(t) * T * T


def test_distillation_matches_hand_values():
    t, s = torch.tensor(T_LOGITS), torch.tensor(S_LOGITS)
    # image→text (rows) and text→image (columns); literals computed by hand (see hand_distillation)
    assert distillation(t, s, 2.0).item() == pytest.approx(5.297990851900126, rel=1e-6)
    assert distillation(t.t(), s.t(), 2.0).item() == pytest.approx(3.465742188747562, rel=1e-6)
    for T in (1.0, 2.0, 4.0):
        assert distillation(t, s, T).item() == pytest.approx(hand_distillation(T_LOGITS, S_LOGITS, T), rel=1e-6)
    # T² scaling: the T=2 value is 4x the plain soft cross-entropy of the tempered logits
    assert distillation(t, s, 2.0).item() == pytest.approx(4 * distillation(t / 2, s / 2, 1.0).item(), rel=1e-6)


def test_distillation_gradient_only_to_student_and_zero_at_teacher():
    t = torch.tensor(T_LOGITS, requires_grad=True)
    s = torch.tensor(T_LOGITS, requires_grad=True)  # student == teacher: soft-CE gradient softmax(s)-p = 0
    distillation(t, s, 2.0).backward()
    assert t.grad is None
    assert s.grad.abs().max() < 1e-6
    with pytest.raises(ValueError, match="shape"):
        distillation(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="temperature"):
        distillation(torch.zeros(2, 3), torch.zeros(2, 3), T=0)


def test_lwf_terms_use_teacher_text_on_both_sides(tiny_clip):
    g = torch.Generator().manual_seed(0)
    fs, ft = (torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1) for _ in range(2))
    text = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=-1)
    scale = tiny_clip.logit_scale.item()
    l_img, l_txt = lwf_terms(tiny_clip, fs, ft, text, 2.0)
    s, t = (scale * fs @ text.t()).tolist(), (scale * ft @ text.t()).tolist()
    assert l_img.item() == pytest.approx(hand_distillation(t, s, 2.0), rel=1e-5)
    st, tt = [list(c) for c in zip(*s)], [list(c) for c in zip(*t)]
    assert l_txt.item() == pytest.approx(hand_distillation(tt, st, 2.0), rel=1e-5)


def small_batch(n=8, classes=2, size=16):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, size, size, generator=g), torch.arange(n) % classes


def test_vr_lwf_distillation_sends_no_gradient_to_student_text(tiny_clip, tiny_stream):
    s = VRLwF(n_sentences=20, length=5, iterations=2, batch_size=8, warmup=0)
    s.setup(tiny_clip)
    task = tiny_stream.tasks[0]
    space, _ = tiny_stream.train_space(0)
    s.begin_task(task, space)
    images, _ = small_batch()
    with torch.no_grad():  # perturb the student so that the distillation is not at its zero-gradient point
        tiny_clip.net.visual.proj.add_(0.05 * torch.randn_like(tiny_clip.net.visual.proj))
    img = tiny_clip.encode_image(images)
    l_img, l_txt = lwf_terms(tiny_clip, img, s.distillation.teacher(images), s.distillation.text, 2.0)
    (l_img + l_txt).backward()
    assert all(p.grad is None for p in tiny_clip.text_parameters())
    assert tiny_clip.net.visual.proj.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [LwF, VRLwF])
def test_teacher_is_frozen_and_does_not_move(cls, tiny_clip, tiny_stream):
    kw = dict(n_sentences=16, length=4) if cls is VRLwF else {}
    s = cls(lr=1e-3, warmup=0, iterations=3, batch_size=8, **kw)
    s.setup(tiny_clip)
    space, _ = tiny_stream.train_space(0)
    s.begin_task(tiny_stream.tasks[0], space)
    images, labels = small_batch()
    with torch.no_grad():
        before_feats = tiny_clip.encode_image(images)
    tower = s.distillation.teacher.tower
    assert tower is not tiny_clip.net.visual
    teacher0 = {k: v.clone() for k, v in tower.state_dict().items()}
    student0 = {k: v.clone() for k, v in tiny_clip.net.visual.state_dict().items()}
    for _ in range(3):
        stats = s.learn(images, labels, space)
        assert math.isfinite(stats["loss"])
    assert s.skipped_steps == 0
    assert all(not p.requires_grad and p.grad is None for p in tower.parameters())
    for k, v in tower.state_dict().items():
        assert torch.equal(v, teacher0[k]), k
    assert any(not torch.equal(v, student0[k]) for k, v in tiny_clip.net.visual.state_dict().items())
    # the teacher still gives the pre-task model's features
    torch.testing.assert_close(s.distillation.teacher(images), before_feats)


def test_random_vocabulary_is_seeded():
    a = random_vocabulary(50, 10, 49408, 49406, 49407, seed=0)
    b = random_vocabulary(50, 10, 49408, 49406, 49407, seed=0)
    c = random_vocabulary(50, 10, 49408, 49406, 49407, seed=1)
    assert a.shape == (50, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 49406).all() and (a[:, -1] == 49407).all()
    assert int(a.min()) >= 0 and int(a.max()) < 49408
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(random_vocabulary(50, 10, 49408, 49406, 49407, seed=0), a)


def test_strategy_vocabulary_fits_context_and_is_deterministic(tiny_clip):
    sot, eot = special_tokens(tiny_clip)
    assert (sot, eot) == (49406, 49407)
    s1, s2, s3 = VRLwF(n_sentences=30), VRLwF(n_sentences=30), VRLwF(n_sentences=30, vocab_seed=5)
    with pytest.warns(UserWarning, match="context"):  # tiny CLIP has 16 positions: 10 + 2 fits, 20 + 2 does not
        VRLwF(length=20).setup(tiny_clip)
    for s in (s1, s2, s3):
        s.setup(tiny_clip)
    assert s1.tokens.shape == (30, 12)
    assert torch.equal(s1.tokens, s2.tokens) and not torch.equal(s1.tokens, s3.tokens)


def test_trimmed_pseudo_sentence_forward_is_exact(tiny_clip):
    s = VRLwF(n_sentences=6, length=5)
    s.setup(tiny_clip)
    feats = s.encode_vocabulary(tiny_clip)
    full = torch.zeros(6, 16, dtype=torch.long)
    full[:, :7] = s.tokens
    with torch.no_grad():
        ref = tiny_clip.text_forward(tiny_clip.token_embedding(full), torch.full((6,), 6))
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)


def test_vocabulary_encoded_once_per_task(tiny_clip, tiny_stream):
    s = VRLwF(n_sentences=12, length=4, iterations=3, batch_size=8, warmup=1)
    calls = []
    orig = tiny_clip.text_forward

    def spy(emb, eot):
        calls.append(emb.shape[1])
        return orig(emb, eot)

    tiny_clip.text_forward = spy
    run(tiny_clip, s, tiny_stream, [AccuracyMatrix()])
    assert s.vocab_encodes == len(tiny_stream) == 3
    assert calls.count(4 + 2) == 3  # one no-grad forward of the 12 pseudo-sentences per task
    assert s.steps == 9 and s.skipped_steps == 0


def test_word_list_vocabulary(tiny_clip, tiny_stream, tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("a striped background\n\nsmall\ncircle\n")
    s = VRLwF(vocabulary=str(path), iterations=2, batch_size=8, warmup=0)
    assert s.words == ["a striped background", "small", "circle"]
    run(tiny_clip, s, tiny_stream, [])
    assert s.tokens is None and s.vocab_encodes == 3
    assert VRLwF(vocabulary=["cat", "dog"]).words == ["cat", "dog"]
    with pytest.raises(FileNotFoundError, match="vocabulary file"):
        VRLwF(vocabulary=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="non-empty"):
        VRLwF(vocabulary=["ok", " "])


def test_lwf_reference_once_per_task_and_space_check(tiny_clip, tiny_stream):
    s = LwF(iterations=2, batch_size=8, warmup=0)
    res = run(tiny_clip, s, tiny_stream, [AccuracyMatrix()])
    assert s.reference_encodes == 3 and s.skipped_steps == 0
    assert len(res["accuracy_matrix"]) == 3
    s2 = LwF(iterations=2)
    s2.setup(tiny_clip)
    space0, _ = tiny_stream.train_space(0)
    space1, _ = tiny_stream.train_space(1)
    s2.begin_task(tiny_stream.tasks[0], space0)
    images, labels = small_batch()
    with pytest.raises(ValueError, match="label space"):
        s2.learn(images, labels, space1)


def test_interpolate_math(tiny_clip):
    tiny_clip.unfreeze("")
    anchor = tiny_clip.trainable_state()
    with torch.no_grad():
        for p in tiny_clip.net.parameters():
            p.add_(torch.randn_like(p))
    moved = {k: v.clone() for k, v in tiny_clip.trainable_state().items()}
    interpolate_(tiny_clip, anchor, 0.3)
    for n, p in tiny_clip.net.named_parameters():
        if n in anchor:
            torch.testing.assert_close(p.detach(), 0.7 * anchor[n] + 0.3 * moved[n])
    snapshot = {k: v.clone() for k, v in anchor.items()}
    interpolate_(tiny_clip, anchor, 1.0)  # α = 1: unchanged
    interpolate_(tiny_clip, anchor, 0.0)  # α = 0: the anchor, which itself never changed
    for n, p in tiny_clip.net.named_parameters():
        if n in anchor:
            assert torch.equal(p.detach(), anchor[n]) and torch.equal(anchor[n], snapshot[n])
    with pytest.raises(ValueError, match="alpha"):
        interpolate_(tiny_clip, anchor, 1.5)
    with pytest.raises(KeyError, match="lacks"):
        interpolate_(tiny_clip, {"nope": torch.zeros(1)}, 0.5)


def test_finetune_wise_alpha(tiny_stream):
    space, _ = tiny_stream.train_space(0)
    images, labels = small_batch()

    def trained(wise_alpha):
        m = make_tiny_clip()
        s = Finetune(lr=1e-3, iterations=2, wise_alpha=wise_alpha)
        s.setup(m)
        s.begin_task(tiny_stream.tasks[0], space)
        for _ in range(2):
            s.learn(images, labels, space)
        before = m.trainable_state()
        s.end_task(tiny_stream.tasks[0], space)
        return before, m.trainable_state()

    zs = make_tiny_clip()
    zs.unfreeze("")
    zero = zs.trainable_state()
    before, after = trained(None)  # option off: end_task changes nothing
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = trained(0.25)
    for k in before:
        torch.testing.assert_close(after[k], 0.75 * zero[k] + 0.25 * before[k])
    with pytest.raises(ValueError, match="alpha"):
        Finetune(wise_alpha=-0.1)


@pytest.mark.parametrize("cls", [LwF, VRLwF])
def test_wise_alpha_in_lwf_strategies(cls, tiny_stream):
    model = make_tiny_clip()
    kw = dict(n_sentences=8, length=3) if cls is VRLwF else {}
    s = cls(lr=1e-3, warmup=0, iterations=2, batch_size=8, wise_alpha=0.0, **kw)  # α = 0: back to zero-shot
    run(model, s, tiny_stream, [])
    zero = make_tiny_clip()
    for (n, p), (_, q) in zip(model.net.named_parameters(), zero.net.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), n
    assert s.steps == 6


def test_lwf_terms_with_a_pinned_distillation_scale(tiny_clip):
    g = torch.Generator().manual_seed(1)
    fs, ft = (torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1) for _ in range(2))
    text = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1)
    l_img, l_txt = lwf_terms(tiny_clip, fs, ft, text, 2.0, scale=100.0)
    s, t = (100.0 * fs @ text.t()).tolist(), (100.0 * ft @ text.t()).tolist()
    assert l_img.item() == pytest.approx(hand_distillation(t, s, 2.0), rel=1e-5)
    st, tt = [list(c) for c in zip(*s)], [list(c) for c in zip(*t)]
    assert l_txt.item() == pytest.approx(hand_distillation(tt, st, 2.0), rel=1e-5)
    assert tiny_clip.logit_scale.item() != pytest.approx(100.0)  # the pin is what made the difference
    with pytest.raises(ValueError, match="distill_scale"):
        LwF(distill_scale=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(temperature=0.0)
