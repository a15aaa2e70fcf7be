"""ImageNet variants (TPT label spaces) and ImageNet-100 split files, on tiny trees with the real folder names."""
from pathlib import Path

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from ctta.data import iter_batches
from streams import imagenet as IN
from streams.manifest import DatasetError, load_meta


def make_tree(root, folders, filled):
    """All class folders (as the release has them); images only in ``filled`` (pixel red value = position)."""
    for f in folders:
        (root / f).mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(filled):
        Image.new("RGB", (10, 6), (k, 0, 0)).save(root / f / f"img_{k}.JPEG")
    return root


def test_stored_masks_match_tpt():
    v = load_meta("imagenet_variants")
    a, r = v["a_indices"], v["r_indices"]
    assert len(a) == len(r) == 200 and a == sorted(a) and r == sorted(r)
    assert a[:8] == [6, 11, 13, 15, 17, 22, 23, 27] and a[-4:] == [984, 986, 987, 988]  # TPT thousand_k_to_200
    assert r[:5] == [1, 2, 4, 6, 8]
    assert IN.v2_order()[:16] == [0, 1, 10, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 11, 110, 111]
    wn = IN.imagenet_wnids()
    assert len(wn) == 1000 and wn[0] == "n01440764" and wn == sorted(wn)
    assert IN.variant_space("imagenet_a").classnames[:2] == ("stingray", "goldfinch")
    assert IN.variant_space("imagenet_r").classnames[:2] == ("goldfish", "great white shark")
    assert len(IN.imagenet_templates("openai")) == 80 and IN.imagenet_templates("openai")[0].count("{}") == 1


def test_imagenet_a_labels_and_structure_check(tmp_path):
    v = load_meta("imagenet_variants")
    wn = IN.imagenet_wnids()
    folders = [wn[i] for i in v["a_indices"]]
    root = make_tree(tmp_path / "imagenet-a", folders, [folders[0], folders[5], folders[199]])
    with pytest.raises(DatasetError, match="holds 3 images, the release has 7500.*\n.*imagenet-a.tar"):
        IN.variant_dataset("imagenet_a", root, 16)
    ds = IN.variant_dataset("imagenet_a", root, 16, verify_level="none")
    x, y, _ = next(iter_batches(ds, 8))
    assert y.tolist() == [0, 5, 199] and x.shape == (3, 3, 16, 16)
    space = IN.variant_space("imagenet_a")
    assert [space.classnames[k] for k in y] == [IMAGENET_CLASSNAMES[v["a_indices"][k]] for k in (0, 5, 199)]
    (root / folders[3]).rmdir()
    with pytest.raises(DatasetError, match="class folders differ"):
        IN.variant_dataset("imagenet_a", root, 16, verify_level="structure")


def test_imagenet_v2_lexicographic_folders(tmp_path):
    root = make_tree(tmp_path / "v2", [str(i) for i in range(1000)], ["2", "10", "100"])
    s = IN.tta_stream(["imagenet_v2"], roots={"imagenet_v2": str(root)}, image_size=8, verify_level="none")
    t = s.tasks[0]
    _, y, _ = next(iter_batches(t.test, 8))
    # folder "10" sorts 3rd (label 2), "100" 4th (label 3), "2" after "199" (label 112)
    assert sorted(y.tolist()) == [2, 3, 112]
    assert t.space.classnames[2] == IMAGENET_CLASSNAMES[10] == "brambling"
    assert t.space.classnames[112] == IMAGENET_CLASSNAMES[2]
    assert s.scope == "own" and t.boundary


def test_imagenet100_split_file(tmp_path):
    wn = IN.imagenet_wnids()
    lines_tr, lines_te = [], []
    for label, w in enumerate(wn[:4]):
        for j in range(2):
            p = tmp_path / "imagenet" / "train" / w / f"{w}_{j}.JPEG"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 6), (label, 0, 0)).save(p, format="PNG")  # lossless
            lines_tr.append(f"train/{w}/{w}_{j}.JPEG {label}")
        q = tmp_path / "imagenet" / "val" / w / "v.JPEG"
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (label, 0, 0)).save(q)
        lines_te.append(f"val/{w}/v.JPEG {label}")
    (tmp_path / "train_100.txt").write_text("\n".join(lines_tr) + "\n")
    (tmp_path / "val_100.txt").write_text("\n".join(lines_te) + "\n")
    s = IN.imagenet100_cil(tmp_path / "train_100.txt", tmp_path / "val_100.txt", data_root=tmp_path,
                           increment=2, order=[3, 1, 0, 2], image_size=8)
    assert s.tasks[0].space.classnames == ("tiger shark", "goldfish")
    assert (len(s.tasks[0].train), len(s.tasks[0].test)) == (4, 2)
    x, y, _ = next(iter_batches(s.tasks[0].train, 8))
    assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), torch.tensor([3, 1])[y])
    (tmp_path / "bad.txt").write_text(f"train/{wn[0]}/a.JPEG 0\ntrain/{wn[1]}/b.JPEG 0\n")
    with pytest.raises(DatasetError, match="label 0 is used for both"):
        IN.read_split_file(tmp_path / "bad.txt", tmp_path)
    with pytest.raises(DatasetError, match="continuum v0.1 release"):
        IN.read_split_file(tmp_path / "missing.txt", tmp_path)


def test_imagenet100_default_order_is_rapf_order():
    from ctta.stream import class_order
    assert class_order(100, 1993)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]  # RAPF class_orders/imagenet100.yaml


def test_duplicate_clip_names_tokenize_identically():
    import open_clip
    names = IN.imagenet_classnames()
    assert len(set(names)) == 1000 and names[657] == "missile" and names[744].strip() == "missile"
    tok = open_clip.get_tokenizer("ViT-B-16")
    space = IN.variant_space("imagenet", "openai")
    assert torch.equal(tok(space.prompts(657)), tok(space.prompts(744)))
    assert torch.equal(tok(space.prompts(836)), tok(space.prompts(837)))


def test_imagenet_c_tree(tmp_path):
    from streams.corrupted import imagenet_c_stream
    wn = IN.imagenet_wnids()
    make_tree(tmp_path / "fog" / "3", wn, [wn[1], wn[999]])
    s = imagenet_c_stream(tmp_path, corruptions=["fog"], severity=3, image_size=8)
    _, y, _ = next(iter_batches(s.tasks[0].test, 8))
    assert y.tolist() == [1, 999] and s.tasks[0].space.classnames[1] == "goldfish" and not s.tasks[0].boundary
    with pytest.raises(DatasetError, match="missing .*fog/5"):
        imagenet_c_stream(tmp_path, corruptions=["fog"], severity=5)


def _imagenet_a_tree(root, names_per_folder):
    """ImageNet-A's 200 wnid folders; ``names_per_folder``: {folder index: [file names]} (red = 30 x order)."""
    v = load_meta("imagenet_variants")
    wn = IN.imagenet_wnids()
    folders = [wn[i] for i in v["a_indices"]]
    make_tree(root, folders, [])
    k = 0
    for f, names in names_per_folder.items():
        for n in names:
            Image.new("RGB", (6, 6), (30 * k, 0, 0)).save(root / folders[f] / n)
            k += 1
    return root


def test_imagenet_a_sh_filter_drops_the_files_the_official_loaders_skip(tmp_path):
    # ImageNet-A file names carry the class name; TDA/DPE/BoostAdapter's listdir_nohidden skips any containing "sh"
    names = {0: ["0.01_stingray_0.9.jpg", "0.02_fish_0.4.jpg"], 7: ["0.3_mushroom_0.1.jpg", "0.4_Shovel_0.2.jpg"],
             199: ["0.5_bushes_0.7.jpg", "0.6_goose_0.8.jpg", "0.7_sh.jpg"]}
    root = _imagenet_a_tree(tmp_path / "imagenet-a", names)
    full = IN.tta_stream(["imagenet_a"], roots={"imagenet_a": str(root)}, image_size=8, verify_level="none")
    sub = IN.tta_stream(["imagenet_a"], roots={"imagenet_a": str(root)}, image_size=8, verify_level="none",
                        sh_filter=True)
    kept = [Path(p).name for p in sub.tasks[0].test.paths]
    # case-sensitive, anywhere in the name: "Shovel" stays, "fish", "mushroom", "bushes", "sh" go
    assert kept == ["0.01_stingray_0.9.jpg", "0.4_Shovel_0.2.jpg", "0.6_goose_0.8.jpg"]
    assert sub.tasks[0].test.targets.tolist() == [0, 7, 199] and len(full.tasks[0].test) == 7
    x, y, _ = next(iter_batches(sub.tasks[0].test, 8))
    assert (x[:, 0, 0, 0] * 255 / 30).round().tolist() == [0, 3, 5]  # the images themselves, not only the names


def test_tta_stream_seeded_shuffle(tmp_path):
    names = {f: [f"img_{f}_{j}.jpg" for j in range(3)] for f in (0, 1, 2, 3)}  # 12 images, class-sorted on disk
    root = _imagenet_a_tree(tmp_path / "imagenet-a", names)
    kw = dict(roots={"imagenet_a": str(root)}, image_size=8, verify_level="none")
    plain = IN.tta_stream(["imagenet_a"], **kw).tasks[0].test
    assert plain.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # folder order: label-correlated
    a = IN.tta_stream(["imagenet_a"], shuffle=True, **kw).tasks[0].test
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1)).tolist()  # the default seed, 1
    assert a.paths == [plain.paths[i] for i in order] and a.targets.tolist() == [plain.targets[i] for i in order]
    assert a.paths == IN.tta_stream(["imagenet_a"], shuffle=True, **kw).tasks[0].test.paths  # reproducible
    b = IN.tta_stream(["imagenet_a"], shuffle=True, shuffle_seed=0, **kw).tasks[0].test
    assert sorted(b.paths) == sorted(plain.paths) and b.paths != a.paths
    both = IN.tta_stream(["imagenet_a"], shuffle=True, sh_filter=True, **kw).tasks[0].test  # no "sh" here: same
    assert both.paths == a.paths
    with pytest.raises(ValueError, match="shuffle_seed"):
        IN.tta_stream(["imagenet_a"], shuffle=True, shuffle_seed="1", **kw)


@pytest.mark.parametrize("method", ["tda", "dpe", "boost_adapter"])
def test_official_online_recipes_shuffle_and_filter_imagenet_a(method, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    configs = Path(__file__).resolve().parents[1] / "configs"
    root = _imagenet_a_tree(tmp_path / "imagenet-a", {0: ["a_fish.jpg", "b.jpg"], 3: ["c.jpg", "d_shark.jpg"]})
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        a = compose("run", overrides=[f"experiment={method}_imagenet_a", f"data_root={tmp_path}",
                                      "stream.verify_level=none"]).stream
        r = compose("run", overrides=[f"experiment={method}_imagenet_r"]).stream
    assert a.shuffle and a.shuffle_seed == 1 and a.sh_filter  # the official loader: shuffled, "sh" files skipped
    assert r.shuffle and r.shuffle_seed == 1 and not r.get("sh_filter", False)
    data = instantiate(a).tasks[0].test
    assert sorted(Path(p).name for p in data.paths) == ["b.jpg", "c.jpg"]


def test_imagenet_a_with_whole_images_runs_a_view_method_end_to_end(tmp_path):
    """With source_side the stream gives whole photographs of several sizes, one a batch; TDA crops its views from
    them and the zero-shot strategy gets the eval crop, both through the sample loop."""
    from ctta.loop.samples import run_samples
    from ctta.online_hooks import OnlineAccuracy
    from ctta.strategies.tda import TDA
    from ctta.strategies.zeroshot import ZeroShot
    from tests.conftest import make_tiny_clip
    root = _imagenet_a_tree(tmp_path / "imagenet-a", {0: ["a.jpg", "b.jpg"], 7: ["c.jpg"]})
    for k, name in enumerate(["a.jpg", "b.jpg"]):  # other sizes than the tree's 6x6: 20x40 and 50x30
        Image.new("RGB", ((40, 30)[k], (20, 50)[k]), (90 * k, 40, 0)).save(next(root.rglob(name)))
    stream = IN.tta_stream(["imagenet_a"], roots={"imagenet_a": str(root)}, image_size=16, verify_level="none",
                           source_side=24)
    data = stream.tasks[0].test
    assert {tuple(data[i][0].shape) for i in range(len(data))} == {(3, 20, 40), (3, 40, 24), (3, 6, 6)}
    for strategy in (TDA(n_views=3, augmix=False), ZeroShot()):
        results = run_samples(make_tiny_clip(), strategy, stream, [OnlineAccuracy()], batch_size=1)
        assert results["online"]["per_domain"]["imagenet_a"]["n"] == 3
