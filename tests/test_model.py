"""`Clip`: trimmed text forward, text-head cache, snapshots, the QuickGELU guard, input validation, loading."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ctta import Clip, LabelSpace
from ctta.model import resolve_quick_gelu
from tests.conftest import TINY_CONFIG, make_tiny_clip


def test_trimmed_text_forward_equals_full_context(tiny_clip):
    texts = ["a photo of a dog.", "a cat", "an outline of a small red star on a striped background"]
    full = F.normalize(tiny_clip.net.encode_text(tiny_clip.tokenize(texts)).float(), dim=-1)
    torch.testing.assert_close(tiny_clip.encode_text(texts), full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tiny_clip.encode_text(texts, trim=False), full, atol=1e-6, rtol=1e-5)


def test_text_head_is_template_average(tiny_clip):
    space = LabelSpace(["dog", "cat"], ["a {}.", "a photo of a {}."])
    per = tiny_clip.encode_text(["a dog.", "a photo of a dog.", "a cat.", "a photo of a cat."]).view(2, 2, -1)
    torch.testing.assert_close(tiny_clip.text_head(space), F.normalize(per.mean(1), dim=-1))


def test_a_class_head_does_not_depend_on_the_classes_encoded_with_it(tiny_clip):
    # built task by task (a class-incremental run) or all at once (a resumed run): the same floats, bit for bit.
    # A forward trimmed to a longer neighbour's length changes the matmul shapes and the last bits of the result.
    short, long_ = LabelSpace(["dog"]), LabelSpace(["dog", "small red star on a striped background"])
    alone = tiny_clip.text_head(short)
    tiny_clip.invalidate_text_cache()
    together = tiny_clip.text_head(long_)
    assert torch.equal(alone[0], together[0])
    tiny_clip.invalidate_text_cache()
    assert torch.equal(tiny_clip.text_head(LabelSpace(["small red star on a striped background", "dog"]))[1], alone[0])
    # many classes of one length (more than a forward's rows): each still as when encoded alone
    many = LabelSpace([f"dog {i}" for i in range(150)], ["{}"])
    tiny_clip.invalidate_text_cache()
    head = tiny_clip.text_head(many)
    for i in (0, 63, 64, 149):
        tiny_clip.invalidate_text_cache()
        assert torch.equal(tiny_clip.text_head(LabelSpace([f"dog {i}"], ["{}"]))[0], head[i])
    torch.testing.assert_close(head, F.normalize(tiny_clip.encode_text([f"dog {i}" for i in range(150)]), dim=-1))


def test_text_head_cache_invalidated_after_text_update(tiny_clip):
    space = LabelSpace(["dog", "cat"])
    h1 = tiny_clip.text_head(space)
    assert tiny_clip.text_head(space) is not h1 and torch.equal(tiny_clip.text_head(space), h1)  # cached rows
    calls = []
    orig = tiny_clip.text_forward
    tiny_clip.text_forward = lambda *a: calls.append(1) or orig(*a)
    tiny_clip.text_head(space)
    assert not calls  # served from cache
    # an optimizer step on the text tower must invalidate it
    params = tiny_clip.unfreeze("transformer.")
    opt = torch.optim.SGD(params, lr=1.0)
    tiny_clip.encode_text(["a dog"]).sum().backward()
    opt.step()
    h2 = tiny_clip.text_head(space)
    assert calls and not torch.allclose(h1, h2)
    # a visual update does not invalidate it
    calls.clear()
    with torch.no_grad():
        tiny_clip.net.visual.conv1.weight.add_(1.0)
    tiny_clip.text_head(space)
    assert not calls


def test_text_head_cache_sees_parameters_added_after_it_was_built(tiny_clip):
    # the text-parameter list is cached between module changes; a LoRA injected into the text tower after the
    # first head, then stepped alone, must still invalidate the head
    from ctta.adapters.inject import inject_lora
    space = LabelSpace(["dog", "cat"])
    h1 = tiny_clip.text_head(space)
    n_before = len(tiny_clip.text_parameters())
    loras = inject_lora(tiny_clip.net, targets=("fc",), towers=("text",), rank=2)
    new = [p for lora in loras for p in lora.parameters()]
    assert len(tiny_clip.text_parameters()) == n_before + len(new)
    with torch.no_grad():
        for p in new:
            p.add_(0.5)  # LoRA's B starts at zero: make the update visible
    assert not torch.allclose(tiny_clip.text_head(space), h1)


def test_snapshot_restore_never_aliases(tiny_clip):
    tiny_clip.unfreeze("visual.")
    anchor = tiny_clip.trainable_state()
    x = torch.rand(3, 3, 16, 16)
    before = tiny_clip.encode_image(x)
    for _ in range(2):
        with torch.no_grad():
            for p in tiny_clip.net.visual.parameters():
                p.add_(0.1)
        assert not torch.allclose(tiny_clip.encode_image(x), before)
        tiny_clip.load_trainable_state(anchor)
        torch.testing.assert_close(tiny_clip.encode_image(x), before, atol=0, rtol=0)
    # the anchor's tensors are not the live parameters
    live = dict(tiny_clip.net.named_parameters())
    assert all(v.data_ptr() != live[k].data_ptr() for k, v in anchor.items())
    with pytest.raises(KeyError, match="lacks"):
        tiny_clip.load_trainable_state({"nope": torch.zeros(1)})


def test_quick_gelu_guard():
    # OpenAI weights were trained with QuickGELU: the plain config is corrected, never silently used
    with pytest.warns(UserWarning, match="QuickGELU"):
        assert resolve_quick_gelu("ViT-B-16", "openai") == ("ViT-B-16-quickgelu", False)
    # a QuickGELU config with GELU-trained weights is refused
    with pytest.raises(ValueError, match="trained with GELU"):
        resolve_quick_gelu("ViT-B-16-quickgelu", "laion2b_s34b_b88k")
    assert resolve_quick_gelu("ViT-B-16", "laion2b_s34b_b88k") == ("ViT-B-16", False)
    assert resolve_quick_gelu("ViT-B-16", None) == ("ViT-B-16", False)


@pytest.mark.parametrize("bad, err, match", [
    (torch.rand(3, 16, 16), ValueError, "rank 3"),
    (torch.rand(2, 1, 16, 16), ValueError, "3 channels"),
    ((torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), TypeError, "uint8"),
    (torch.full((2, 3, 16, 16), float("nan")), ValueError, "non-finite"),
    (torch.rand(0, 3, 16, 16), ValueError, "empty"),
    (torch.rand(1, 3, 20, 20), ValueError, "16x16"),
])
def test_bad_images_get_clear_errors(tiny_clip, bad, err, match):
    with pytest.raises(err, match=match):
        tiny_clip.encode_image(bad)


def test_local_checkpoint_round_trip(tmp_path):
    src = make_tiny_clip(seed=3)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.net.state_dict().items()}, str(path))
    loaded = Clip.from_config(TINY_CONFIG, name="tiny-test", checkpoint=path)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded.encode_image(x), src.encode_image(x))
    assert loaded.provenance()["checkpoint_sha256"] and loaded.provenance()["pretrained"] == str(path)
    with pytest.raises(FileNotFoundError):
        Clip.from_config(TINY_CONFIG, name="tiny-test", checkpoint=tmp_path / "missing.safetensors")


def test_unfreeze_selection(tiny_clip):
    ps = tiny_clip.unfreeze("visual.")
    assert ps and all(p.requires_grad for p in ps)
    assert not tiny_clip.net.logit_scale.requires_grad
    tiny_clip.freeze()
    tiny_clip.unfreeze("")
    assert not tiny_clip.net.logit_scale.requires_grad
    with pytest.raises(ValueError, match="selected no parameters"):
        tiny_clip.unfreeze("nonexistent.")


def test_eval_mode_restores_the_mode_and_skips_the_walk_when_nothing_trains(tiny_clip, monkeypatch):
    m = tiny_clip
    assert not any(x.training for x in m.modules())  # a Clip starts in eval mode, the wrapper and the net alike
    calls = []
    real = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: calls.append(mode) or real(self, mode))
    space = LabelSpace(["a", "b"])
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = m.zero_shot(x, space)
    assert calls == []  # nothing was training: no recursive eval()/train() per prediction
    real(m, True)
    calls.clear()
    torch.testing.assert_close(m.zero_shot(x, space), before)  # eval-mode logits from a model in train mode
    assert all(x.training for x in m.modules()) and calls[0] is False  # switched to eval, then restored
    real(m, False)
    real(m.net.visual, True)  # a mixed state (only the image tower training) comes back as it was
    with m.eval_mode():
        assert not any(x.training for x in m.modules())
    assert all(x.training for x in m.net.visual.modules()) and not m.training and not m.net.transformer.training
    real(m, True)
    with pytest.raises(RuntimeError), m.eval_mode():  # the mode comes back even when the block fails
        raise RuntimeError
    assert m.training and m.net.training
