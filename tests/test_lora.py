"""LoRA adapters (ctta.adapters.lora) in PEFT's test style: zero-init identity, merged == unmerged, exact unmerge,
idempotent merge, q/k/v row locality, and a merged model that is the base model again."""
from __future__ import annotations

import pytest
import torch
from open_clip.transformer import Attention
from torch import nn

from ctta.adapters.inject import inject_lora, lora_modules, lora_wrappers, merge_and_remove, remove_lora
from ctta.adapters.lora import LoRA, LoRAAttention, LoRALinear
from ctta.task_lora import MergeHistory
from tests.conftest import make_tiny_clip

PROMPTS = ["a photo of a cat.", "a red star", "x"]


def outputs(clip):
    g = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 16, 16, generator=g)
    with torch.no_grad():
        return clip.encode_image(images), clip.encode_text(PROMPTS)


def randomize(loras, std=0.2):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in loras:
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * std)


def all_equal(a, b, atol=0.0):
    return all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a, b))


def test_zero_init_leaves_outputs_identical():
    clip = make_tiny_clip()
    ref = outputs(clip)
    loras = inject_lora(clip, rank=4, gated=True)
    assert len(loras) == 6 * 2 * 2  # 6 targets x 2 blocks x 2 towers
    assert all(float(lora.lora_B.detach().abs().sum()) == 0 for lora in loras)
    assert all_equal(outputs(clip), ref, atol=1e-6)
    randomize(loras)
    assert not all_equal(outputs(clip), ref, atol=1e-4)  # the test can fail: non-zero B changes outputs


def test_merged_equals_unmerged_and_unmerge_is_exact():
    clip = make_tiny_clip()
    loras = inject_lora(clip, rank=4, gated=True)
    randomize(loras)
    before = {k: v.clone() for k, v in clip.net.state_dict().items()}
    unmerged = outputs(clip)
    wrappers = [w for _, _, w in lora_wrappers(clip)]
    for w in wrappers:
        w.merge()
    changed = [k for k, v in clip.net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith(("in_proj_weight", "out_proj.weight", "base_layer.weight")) for k in changed)
    assert all_equal(outputs(clip), unmerged, atol=1e-5)
    once = {k: v.clone() for k, v in clip.net.state_dict().items()}
    for w in wrappers:
        w.merge()  # idempotent
    assert all(torch.equal(v, once[k]) for k, v in clip.net.state_dict().items())
    for w in wrappers:
        w.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in clip.net.state_dict().items())  # bit-exact
    assert all_equal(outputs(clip), unmerged, atol=1e-6)


@pytest.mark.parametrize("target,row", [("q", 0), ("k", 1), ("v", 2)])
def test_qkv_delta_touches_only_its_rows(target, row):
    clip = make_tiny_clip()
    attn = clip.net.visual.transformer.resblocks[0].attn
    W0 = attn.in_proj_weight.detach().clone()
    d = W0.shape[1]
    (lora,) = inject_lora(clip, targets=[target], layers=[0], towers=["visual"], rank=2)
    randomize([lora])
    wrapper = clip.net.visual.transformer.resblocks[0].attn
    wrapper.merge()
    W = wrapper.base_layer.in_proj_weight.detach()
    for i in range(3):
        block = slice(i * d, (i + 1) * d)
        if i == row:
            assert torch.allclose(W[block], W0[block] + lora.get_delta_weight().detach(), atol=1e-6)
            assert not torch.equal(W[block], W0[block])
        else:
            assert torch.equal(W[block], W0[block])


def test_delta_weight_is_b_gate_a_scaled():
    lora = LoRA(5, 3, 4, gated=True, scaling=0.5)
    with torch.no_grad():
        lora.lora_B.copy_(torch.arange(12.0).view(3, 4))
        lora.gate.copy_(torch.tensor([1.0, 0.0, -2.0, 0.5]))
    expected = 0.5 * lora.lora_B @ torch.diag(lora.gate) @ lora.lora_A
    assert torch.allclose(lora.get_delta_weight(), expected)
    x = torch.randn(7, 5)
    assert torch.allclose(lora(x), x @ expected.t(), atol=1e-5)  # low-rank path == dense delta
    assert lora.effective_rank == 3
    assert lora.prune() == 3 and lora.rank == 3
    assert torch.allclose(lora.get_delta_weight(), expected, atol=1e-6)  # pruning a zero gate changes nothing


def test_merge_and_remove_restores_base_structure():
    base = make_tiny_clip()
    clip = make_tiny_clip()
    loras = inject_lora(clip, rank=4, gated=True)
    randomize(loras)
    lora_out = outputs(clip)
    assert merge_and_remove(clip) == 2 * 2 * 3  # attn + c_fc + c_proj per block, 2 blocks, 2 towers
    assert lora_modules(clip) == [] and lora_wrappers(clip) == []
    assert sum(p.numel() for p in clip.parameters()) == sum(p.numel() for p in base.parameters())
    assert [type(m) for m in clip.net.modules()] == [type(m) for m in base.net.modules()]
    sd, sd0 = clip.net.state_dict(), base.net.state_dict()
    assert list(sd) == list(sd0) and all(sd[k].shape == sd0[k].shape for k in sd)
    assert all_equal(outputs(clip), lora_out, atol=1e-5)


def test_remove_lora_discards_updates():
    clip = make_tiny_clip()
    ref = outputs(clip)
    randomize(inject_lora(clip, rank=2))
    for _, _, w in lora_wrappers(clip):
        w.merge()
    assert remove_lora(clip) == 12
    assert all_equal(outputs(clip), ref, atol=0)


def test_selection_by_layer_tower_and_target():
    clip = make_tiny_clip()
    loras = inject_lora(clip, targets=("q", "fc"), layers=[-1], towers=("text",), rank=3)
    assert [lora.name for lora in loras] == ["text.1.q", "text.1.fc"]
    blocks = clip.net.transformer.resblocks
    assert isinstance(blocks[1].attn, LoRAAttention) and list(blocks[1].attn.lora) == ["q"]
    assert isinstance(blocks[1].mlp.c_fc, LoRALinear) and isinstance(blocks[1].mlp.c_proj, nn.Linear)
    assert isinstance(blocks[0].attn, nn.MultiheadAttention)
    assert not lora_wrappers(clip.net.visual)
    per_tower = inject_lora(make_tiny_clip(), targets=["out"], layers={"visual": [0], "text": []}, rank=2)
    assert [lora.name for lora in per_tower] == ["visual.0.out"]


def test_only_lora_parameters_train_and_receive_gradients():
    clip = make_tiny_clip()
    clip.freeze()
    loras = inject_lora(clip, rank=2, gated=True)
    trainable = {id(p) for p in clip.parameters() if p.requires_grad}
    assert trainable == {id(p) for lora in loras for p in lora.parameters()}
    img, txt = torch.rand(2, 3, 16, 16), PROMPTS[:2]
    (clip.encode_image(img).sum() + clip.encode_text(txt).sum()).backward()
    assert all(lora.lora_B.grad is not None and lora.lora_B.grad.abs().sum() > 0 for lora in loras)


def test_bad_inputs_raise_clear_errors():
    clip = make_tiny_clip()
    with pytest.raises(ValueError, match="targets"):
        inject_lora(clip, targets=["qkv"])
    with pytest.raises(IndexError, match="layer 5"):
        inject_lora(clip, layers=[5])
    with pytest.raises(ValueError, match="tower"):
        inject_lora(clip, towers=["audio"])
    inject_lora(clip, rank=2)
    with pytest.raises(RuntimeError, match="merge_and_remove"):
        inject_lora(clip, rank=2)
    other = make_tiny_clip()
    other.net.visual.transformer.resblocks[0].attn = nn.Identity()
    with pytest.raises(NotImplementedError, match="in_proj_weight"):
        inject_lora(other, towers=["visual"])


def test_open_clip_custom_attention_is_supported():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(3, 5, 16)
    ref = attn(x)
    wrapper = LoRAAttention(attn, {t: LoRA(16, 16, 2, name=t) for t in ("q", "v", "out")})
    assert torch.allclose(wrapper(x), ref, atol=1e-6)
    randomize(wrapper.lora.values())
    unmerged = wrapper(x)
    wrapper.merge()
    assert torch.allclose(wrapper(x), unmerged, atol=1e-5) and not torch.allclose(unmerged, ref, atol=1e-4)


def test_merge_history_drift_equals_weight_change():
    clip = make_tiny_clip()
    W0 = {k: v.clone() for k, v in clip.net.state_dict().items()}
    hist = MergeHistory()
    for seed in range(2):  # two tasks: inject, train (random B), record, merge
        loras = inject_lora(clip, rank=3, gated=True, targets=("q", "k", "fc"))
        torch.manual_seed(seed)
        randomize(loras)
        hist.record(loras)
        merge_and_remove(clip)
    diff = sum(float((v - W0[k]).square().sum()) for k, v in clip.net.state_dict().items())
    assert hist.drift() == pytest.approx(diff ** 0.5, rel=1e-4)
    assert all(B.shape[1] == 6 for B, _ in hist.factors.values())  # ranks of both tasks kept


def test_training_path_equals_inference_path():
    """With grad enabled the Linear wrapper runs the rank-r bottleneck, without it one matmul with W + ΔW."""
    lin = nn.Linear(6, 5)
    lora = LoRA(6, 5, 3, gated=True)
    randomize([lora])
    wrapper = LoRALinear(lin, lora)
    x = torch.randn(4, 7, 6)
    with torch.no_grad():
        fast = wrapper(x)
    slow = wrapper(x)
    assert slow.requires_grad and torch.allclose(fast, slow, atol=1e-6)
    assert torch.allclose(slow, lin(x) + x @ lora.get_delta_weight().t(), atol=1e-6)
