"""A ``ModifiedResNet`` image tower (CLIP RN50 family): BatchNorm semantics owned by `Clip` (frozen statistics stay
frozen in train mode; fine-tuned ones update as standard BatchNorm; snapshots carry them), TENT's batch statistics,
and LoRA on the attention pool."""
from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ctta import Clip, LabelSpace, class_incremental, run
from ctta.adapters.inject import inject_lora, lora_wrappers, merge_and_remove
from ctta.adapters.lora import LoRAAttentionPool
from ctta.batchnorm import TrainabilityBatchNorm2d
from ctta.online import wrap
from ctta.strategies import Finetune, LoRA, RankSelectiveLoRA, Tent
from tests._resnet import RESNET_CONFIG, make_resnet_clip, resnet_dataset, resnet_images

SPACE = LabelSpace([f"class {i}" for i in range(4)])


def bn_buffers(clip: Clip) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in clip.net.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def bn1_input(clip: Clip, x: torch.Tensor) -> torch.Tensor:
    """The input of the stem's first BatchNorm (``visual.bn1``) for images ``x``."""
    with torch.no_grad():
        return clip.net.visual.conv1(clip.normalize(x))


def by_hand(bn: nn.BatchNorm2d, h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``(h − mean) / sqrt(var + eps) · γ + β`` per channel."""
    v = lambda t: t.detach().view(1, -1, 1, 1)  # noqa: E731
    return (h - v(mean)) / torch.sqrt(v(var) + bn.eps) * v(bn.weight) + v(bn.bias)


# --------------------------------------------------------------------------------------------- BatchNorm semantics
def test_checkpoint_keys_unchanged_and_an_open_clip_checkpoint_loads_exactly(tmp_path):
    src = make_resnet_clip(seed=3)
    assert all(type(m) is TrainabilityBatchNorm2d for m in src.net.visual.modules() if isinstance(m, nn.BatchNorm2d))
    plain = open_clip.create_model("tiny-resnet-test")  # the registry entry Clip.from_config made
    assert list(plain.state_dict()) == list(src.net.state_dict())
    path = tmp_path / "rn.safetensors"
    save_file({k: v.contiguous() for k, v in src.net.state_dict().items()}, str(path))
    loaded = Clip.from_config(RESNET_CONFIG, name="tiny-resnet-test", checkpoint=path)
    plain.load_state_dict(src.net.state_dict())
    x = resnet_images(4, 1)
    with torch.no_grad():
        ref = nn.functional.normalize(plain.eval().encode_image(loaded.normalize(x)), dim=-1)
    torch.testing.assert_close(loaded.encode_image(x), ref, atol=0, rtol=0)


def test_frozen_batchnorm_is_batch_independent_and_unchanged_in_train_mode():
    clip = make_resnet_clip()
    x = resnet_images(6, 2)
    eval_feats = clip.encode_image(x)
    before = bn_buffers(clip)
    clip.net.train()  # what a strategy training a prompt or a LoRA does
    both = clip.encode_image(x)
    alone = torch.cat([clip.encode_image(x[:2]), clip.encode_image(x[2:3]), clip.encode_image(x[3:])])
    torch.testing.assert_close(both, eval_feats, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone, both, atol=1e-6, rtol=0)
    assert same(bn_buffers(clip), before)
    # the test can fail: a plain BatchNorm in train mode normalises with the batch's statistics
    bn = clip.net.visual.bn1
    h = bn1_input(clip, x)
    torch.testing.assert_close(bn(h), by_hand(bn, h, before["visual.bn1.running_mean"],
                                              before["visual.bn1.running_var"]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(nn.BatchNorm2d.forward(bn, h), bn(h), atol=1e-3)


def test_trainable_batchnorm_updates_its_statistics_as_standard_batchnorm():
    clip = make_resnet_clip()
    clip.unfreeze("visual.")
    bn = clip.net.visual.bn1
    x = resnet_images(4, 3)
    h = bn1_input(clip, x)
    m0, v0 = bn.running_mean.clone(), bn.running_var.clone()
    clip.net.train()
    out = bn(h)
    mu, var_b = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    n = h.numel() // h.shape[1]
    torch.testing.assert_close(out, by_hand(bn, h, mu, var_b), atol=1e-5, rtol=1e-5)  # batch statistics
    torch.testing.assert_close(bn.running_mean, 0.9 * m0 + 0.1 * mu)  # momentum 0.1, unbiased variance
    torch.testing.assert_close(bn.running_var, 0.9 * v0 + 0.1 * var_b * n / (n - 1))
    assert int(bn.num_batches_tracked) == 1
    # eval mode: the running statistics, not updated
    clip.net.eval()
    m1 = bn.running_mean.clone()
    torch.testing.assert_close(bn(h), by_hand(bn, h, m1, bn.running_var), atol=1e-5, rtol=1e-5)
    assert torch.equal(bn.running_mean, m1)


def test_snapshots_carry_the_statistics_of_trainable_batchnorms_only():
    clip = make_resnet_clip()
    clip.unfreeze("visual.layer4.")
    state = clip.trainable_state()
    stats = sorted(k for k in state if "running" in k or "batches" in k)
    assert stats and all(k.startswith("visual.layer4.") for k in stats)
    assert "visual.bn1.running_mean" not in state
    x = resnet_images(4, 4)
    anchor = clip.encode_image(x)
    clip.net.train()
    for k in range(2):
        clip.encode_image(resnet_images(4, 10 + k))  # moves layer4's running statistics, nothing else
    clip.net.eval()
    assert not torch.allclose(clip.encode_image(x), anchor, atol=1e-4)
    clip.load_trainable_state(state)
    torch.testing.assert_close(clip.encode_image(x), anchor, atol=0, rtol=0)
    assert all(v.data_ptr() != t.data_ptr() for (k, v), t in zip(state.items(), clip.trainable_tensors().values()))


def test_full_finetuning_updates_statistics_and_predicts_with_them():
    clip = make_resnet_clip()
    before = bn_buffers(clip)
    stream = class_incremental(SPACE, resnet_dataset(8, 4, 1), resnet_dataset(4, 4, 2), increment=2, seed=1)
    s = Finetune(params="visual.", lr=1e-3, batch_size=4, epochs=1)
    run(clip, s, stream, progress=False)
    after = bn_buffers(clip)
    assert all(not torch.equal(after[k], before[k]) for k in after)  # every BatchNorm of the tower moved
    x = resnet_images(4, 5)
    assert torch.equal(s.predict(x, SPACE)[:2], s.predict(x[:2], SPACE))  # eval: running statistics


# --------------------------------------------------------------------------------------------- TENT
def test_tent_normalises_with_batch_statistics_in_adapt_and_predict():
    clip = make_resnet_clip()
    ad = wrap(clip, Tent(lr=1e-2), SPACE, reset="never")
    s = ad.strategy
    assert s.batch_norms and all(n.startswith("visual.") for n in s.batch_norms)
    assert all(".bn" in n or "downsample" in n for n in s.param_names)  # BatchNorm affine parameters only
    assert {p for p in clip.net.parameters() if p.requires_grad} == {
        p for n, p in clip.net.named_parameters() if n in set(s.param_names)}
    bn, x = clip.net.visual.bn1, resnet_images(4, 6)
    h = bn1_input(clip, x)
    running = bn_buffers(clip)
    mu, var_b = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    for mode in (True, False):  # the reference adapts and predicts in train mode; our predict runs in eval mode
        clip.net.train(mode)
        torch.testing.assert_close(bn(h), by_hand(bn, h, mu, var_b), atol=1e-5, rtol=1e-5)
    clip.net.eval()
    p_before = s.predict(x, SPACE)
    assert not torch.equal(s.predict(x[:2], SPACE), p_before[:2])  # batch statistics: depends on the batch
    ad(x)
    assert same(bn_buffers(clip), running)  # running statistics neither used nor changed
    assert not torch.allclose(s.predict(x, SPACE), p_before)  # the affine parameters moved
    ad.reset()
    assert torch.equal(s.predict(x, SPACE), p_before)
    with pytest.raises(ValueError, match="at least 2 images"):  # layer4 sees a 1x1 map at 32 px
        s.predict(x[:1], SPACE)
    clip.freeze()  # a later strategy's setup: back to running statistics
    clip.net.train()
    torch.testing.assert_close(bn(h), by_hand(bn, h, running["visual.bn1.running_mean"],
                                              running["visual.bn1.running_var"]), atol=1e-5, rtol=1e-5)


def test_tent_on_a_vit_tower_is_unchanged(tiny_clip):
    s = Tent()
    s.setup(tiny_clip)
    assert s.batch_norms == [] and s.param_names and all(".ln_" in n or n.startswith("visual.ln_")
                                                         for n in s.param_names)


# --------------------------------------------------------------------------------------------- LoRA
def randomize(loras, std=0.3):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for lora in loras:
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * std)


def test_lora_maps_onto_the_attention_pool_and_merges_exactly():
    clip = make_resnet_clip()
    x = resnet_images(3, 8)
    ref = clip.encode_image(x)
    loras = inject_lora(clip, rank=2, gated=True)  # all six targets, both towers
    visual = [lo for lo in loras if lo.name.startswith("visual.")]
    assert [lo.name for lo in visual] == [f"visual.attnpool.{t}" for t in ("q", "k", "v", "out")]  # fc/proj skipped
    assert len(loras) == 4 + 6 * 2  # + 6 targets x 2 text blocks
    pool = clip.net.visual.attnpool
    assert isinstance(pool, LoRAAttentionPool)
    assert visual[3].lora_B.shape[0] == pool.base_layer.c_proj.out_features  # out: c_proj, 512 -> embed_dim
    torch.testing.assert_close(clip.encode_image(x), ref, atol=0, rtol=0)  # B = 0: identity
    randomize(visual)
    unmerged = clip.encode_image(x)
    assert not torch.allclose(unmerged, ref, atol=1e-3)  # every target reaches the output
    for t in ("q", "k", "v", "out"):  # ... each one on its own
        only = make_resnet_clip()
        (lo,) = inject_lora(only, targets=[t], towers=["visual"], rank=2)
        randomize([lo], std=2.0)  # at 32 px the pool attends over 2 tokens only: q / k act weakly
        assert not torch.allclose(only.encode_image(x), ref, atol=1e-5), t
    base_keys = list(make_resnet_clip().net.state_dict())
    wrappers = lora_wrappers(clip)
    assert merge_and_remove(clip) == len(wrappers) == 1 + 2 * 3  # the pool + per text block: attn, c_fc, c_proj
    assert type(clip.net.visual.attnpool).__name__ == "AttentionPool2d"
    assert list(clip.net.state_dict()) == base_keys
    assert torch.equal(clip.encode_image(x), unmerged)  # merged == unmerged, bit for bit


def test_lora_on_the_resnet_tower_refuses_what_it_cannot_adapt():
    clip = make_resnet_clip()
    with pytest.raises(ValueError, match=r"ModifiedResNet.*\('q', 'k', 'v', 'out'\)"):
        inject_lora(clip, targets=["fc", "proj"], towers=["visual"], rank=2)
    with pytest.raises(IndexError, match="attention pool, is 0 or -1"):
        inject_lora(clip, layers=[1], towers=["visual"], rank=2)
    assert [lo.name for lo in inject_lora(clip, targets=["v"], layers=[-1], towers=["visual"], rank=2)] == [
        "visual.attnpool.v"]
    with pytest.raises(RuntimeError, match="already carries LoRA"):
        inject_lora(clip, targets=["q"], towers=["visual"], rank=2)
    assert inject_lora(make_resnet_clip(), layers={"visual": [], "text": [0]}, rank=2)[0].name.startswith("text.")


@pytest.mark.parametrize("cls", [LoRA, RankSelectiveLoRA])
def test_a_task_merge_gives_the_outputs_of_the_unmerged_adapter(cls):
    clip = make_resnet_clip()
    stream = class_incremental(SPACE, resnet_dataset(8, 4, 1), resnet_dataset(4, 4, 2), increment=2, seed=1)
    s = cls(rank=2, lr=5e-2, batch_size=4, iterations=3)
    s.setup(clip)
    task = stream.tasks[0]
    space, _ = stream.train_space(0)
    s.begin_task(task, space)
    for k in range(3):
        xb, yb = task.train.get_batch(torch.arange(4))
        s.learn(xb, yb, space)
    assert any(float(lo.lora_B.detach().abs().sum()) > 0 for lo in s.loras if lo.name.startswith("visual.attnpool"))
    x = resnet_images(4, 9)
    before = s.predict(x, SPACE)
    s.end_task(task, space)  # prune (CoDyRA), merge into the base weights, inject a fresh LoRA
    torch.testing.assert_close(s.predict(x, SPACE), before, atol=1e-6, rtol=1e-6)
    assert isinstance(clip.net.visual.attnpool, LoRAAttentionPool) and not clip.net.visual.attnpool.merged


def test_attention_pool_merge_touches_only_its_weights_and_unmerges_exactly():
    clip = make_resnet_clip()
    loras = inject_lora(clip, targets=["q", "v", "out"], towers=["visual"], rank=2)
    randomize(loras)
    before = {k: v.clone() for k, v in clip.net.state_dict().items()}
    pool = clip.net.visual.attnpool
    pool.merge()
    changed = sorted(k for k, v in clip.net.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == [f"visual.attnpool.base_layer.{n}.weight" for n in ("c_proj", "q_proj", "v_proj")]
    delta = loras[0].get_delta_weight().detach()
    assert torch.equal(pool.base_layer.q_proj.weight, before["visual.attnpool.base_layer.q_proj.weight"] + delta)
    pool.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in clip.net.state_dict().items())  # bit-exact
