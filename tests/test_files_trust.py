"""Files you can trust (issue #15, Deliver 7): content-hashed checkpoints, cleanup of interrupted writes, the
micro-CLIP weights' hash, and CIFAR pickles read through a restricted unpickler."""
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ctta.io import atomic_torch_save, atomic_write_json, safe_torch_load

ROOT = Path(__file__).resolve().parents[1]


def _state():
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(32)}, "next_task": 3,
            "results": {"acc": [0.5, 0.25]}, "name": "run"}


# --------------------------------------------------------------------------------------- hashed checkpoints
def test_round_trip_keeps_every_value(tmp_path):
    path = atomic_torch_save(tmp_path / "ck.pt", _state())
    back = safe_torch_load(path)
    assert torch.equal(back["model"]["w"], _state()["model"]["w"]) and back["next_task"] == 3
    assert back["results"] == {"acc": [0.5, 0.25]} and back["name"] == "run"


def test_every_flipped_byte_is_refused_with_the_file_named(tmp_path):
    """Flip one byte at every position of a small checkpoint (header included): each load must fail, naming
    the file. The old format loaded most payload flips silently (tensor bytes are not checked by torch)."""
    path = atomic_torch_save(tmp_path / "ck.pt", {"w": torch.arange(16, dtype=torch.float32)})
    good = path.read_bytes()
    silent = []
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x01
        path.write_bytes(bytes(bad))
        try:
            safe_torch_load(path)
            silent.append(i)
        except Exception as e:
            assert str(path) in str(e), (i, str(e))
    assert not silent, f"{len(silent)} of {len(good)} single-byte flips loaded silently (e.g. at {silent[:5]})"


def test_a_flipped_tensor_byte_says_content_hash_mismatch(tmp_path):
    w = torch.full((256,), 0.5)
    path = atomic_torch_save(tmp_path / "ck.pt", {"w": w})
    data = bytearray(path.read_bytes())
    pos = bytes(data).rfind(w.numpy().tobytes())  # the raw tensor storage inside the zip payload
    assert pos > 0
    data[pos + 100] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"ck\.pt is corrupt: content hash mismatch"):
        safe_torch_load(path)


def test_truncated_file_is_refused(tmp_path):
    path = atomic_torch_save(tmp_path / "ck.pt", _state())
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match="corrupt: truncated"):
        safe_torch_load(path)


def test_plain_torch_file_without_header_is_refused(tmp_path):
    """Chosen policy: a file that cannot be verified is not loaded (nothing released was written without it)."""
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match=r"plain\.pt is not a ctta checkpoint file \(no content-hash header\)"):
        safe_torch_load(path)


def test_load_still_refuses_arbitrary_objects(tmp_path):
    """Verified bytes are still unpickled with weights_only=True: a hashed file holding an object is refused."""
    path = atomic_torch_save(tmp_path / "obj.pt", {"p": Path("/x")})
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        safe_torch_load(path)


# --------------------------------------------------------------------------------------- interrupted writes
_KILLED_WRITER = textwrap.dedent("""
    import os, sys, torch
    from ctta.io import atomic_torch_save

    class Die:  # pickled half-way through the payload: the process dies mid-write, like a killed job
        def __reduce__(self):
            os._exit(3)

    atomic_torch_save(sys.argv[1], {"w": torch.zeros(1000), "x": Die()})
""")


def test_leftovers_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoint.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], env=env, capture_output=True)
    assert r.returncode == 3, r.stderr.decode()
    left = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(left) == 1 and not target.exists()  # what a killed write leaves
    atomic_torch_save(target, {"w": torch.ones(2)})
    assert not list(tmp_path.glob(".*.tmp")) and torch.equal(safe_torch_load(target)["w"], torch.ones(2))


def test_a_write_in_progress_and_other_targets_are_left_alone(tmp_path):
    mine = tmp_path / f".checkpoint.pt.{__import__('ctta.files').files._host()}.{os.getpid()}.abcd1234.tmp"
    other = tmp_path / ".results.json.somehost.1.abcd1234.tmp"
    mine.write_bytes(b"x")
    other.write_bytes(b"x")
    atomic_torch_save(tmp_path / "checkpoint.pt", {"w": torch.ones(1)})
    assert mine.exists() and other.exists()  # this process is alive; another target's file is not ours to judge


def test_old_style_leftovers_go_once_stale(tmp_path):
    old = tmp_path / ".results.json.k2j3h4g5.tmp"  # mkstemp name of the previous version
    old.write_bytes(b"{")
    atomic_write_json(tmp_path / "results.json", {"a": 1})
    assert old.exists()  # fresh: might be a write in progress
    os.utime(old, (0, 0))
    atomic_write_json(tmp_path / "results.json", {"a": 2})
    assert not old.exists()


# --------------------------------------------------------------------------------------- weights files
from ctta import Clip  # noqa: E402
from ctta import model as model_mod  # noqa: E402
from ctta.weights import WEIGHTS_SHA256_KEY, WeightsFileError, meta_path, weights_sha256_entry  # noqa: E402


def _asset_copy(tmp_path, with_hash=True):
    """The embedded micro-CLIP weights copied to tmp_path, with a meta recording their hash."""
    dst = tmp_path / "micro-clip.safetensors"
    dst.write_bytes(model_mod.BUILTIN_WEIGHTS.read_bytes())
    if with_hash:
        meta_path(dst).write_text(json.dumps({"steps": 1, **weights_sha256_entry(dst)}))
    return dst


def _flip(path, pos):
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def _data_start(path):
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_weights_with_their_recorded_hash_load_and_record_it(tmp_path):
    w = _asset_copy(tmp_path)
    clip = Clip.from_pretrained("micro-clip", w)
    assert clip.provenance()["checkpoint_sha256"] == json.loads(meta_path(w).read_text())[WEIGHTS_SHA256_KEY]


def test_a_flipped_weight_byte_is_refused_by_the_recorded_hash(tmp_path):
    w = _asset_copy(tmp_path)
    _flip(w, _data_start(w) + 5000)  # inside a tensor: the file stays a well-formed safetensors file
    with pytest.raises(WeightsFileError, match=r"micro-clip\.safetensors is corrupt: content hash mismatch"):
        Clip.from_pretrained("micro-clip", w)


def test_the_builtin_weights_are_checked_against_the_meta_hash(tmp_path, monkeypatch):
    w = _asset_copy(tmp_path)
    monkeypatch.setattr(model_mod, "BUILTIN_WEIGHTS", w)
    Clip.from_pretrained("micro-clip", "builtin")  # intact: loads
    _flip(w, w.stat().st_size - 1)
    with pytest.raises(WeightsFileError, match="content hash mismatch"):
        Clip.from_pretrained("micro-clip", "builtin")


def test_inconsistent_safetensors_are_refused_without_a_hash(tmp_path):
    """No meta beside the file: its structure is still checked (truncated, extended, damaged header)."""
    w = _asset_copy(tmp_path, with_hash=False)
    good = w.read_bytes()
    w.write_bytes(good[:-7])
    with pytest.raises(WeightsFileError, match="not a valid safetensors file.*truncated"):
        Clip.from_pretrained("micro-clip", w)
    w.write_bytes(good + b"\0" * 4)
    with pytest.raises(WeightsFileError, match="not a valid safetensors file"):
        Clip.from_pretrained("micro-clip", w)
    header = good[8:_data_start(w)]
    w.write_bytes(good[:8] + header.replace(b'"data_offsets":[0,', b'"data_offsets":[2,', 1) + good[8 + len(header):])
    with pytest.raises(WeightsFileError, match="not a valid safetensors file"):
        Clip.from_pretrained("micro-clip", w)


# --------------------------------------------------------------------------------------- CIFAR pickles
import io  # noqa: E402
import types  # noqa: E402

from streams import cifar  # noqa: E402
from streams.manifest import DatasetError  # noqa: E402
from tests.test_recipes import write_cifar  # noqa: E402


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR-100 release: protocol 2, every string a byte string
    (BINSTRING opcodes), numpy arrays via ``numpy.core.multiarray._reconstruct``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([len(b)])) if len(b) < 256
                   else (pickle.BINSTRING + struct.pack("<i", len(b))))
        self.write(b)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        mod = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(obj.__module__, obj.__module__)
        self.write(pickle.GLOBAL + f"{mod}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str
    dispatch[type] = dispatch[types.FunctionType] = dispatch[types.BuiltinFunctionType] = save_global


def _py2_bytes(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def _release_like(n=4):
    data = (np.arange(n * 3072) % 251).astype(np.uint8).reshape(n, 3072)
    return {b"batch_label": "training batch 1 of 1", b"filenames": [f"img_{i}.png" for i in range(n)],
            b"data": data, b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}


@pytest.mark.parametrize("writer", ["python2", "python3-protocol2"])
def test_cifar_pickles_in_the_release_format_load_through_the_restricted_unpickler(tmp_path, writer):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    doc = _release_like()
    (d / "train").write_bytes(_py2_bytes(doc) if writer == "python2" else pickle.dumps(doc, protocol=2))
    x, y = cifar.read_cifar100(tmp_path, "train")
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3]
    assert torch.equal(x.reshape(4, -1), torch.from_numpy(doc[b"data"]))
    name = cifar.load_cifar_pickle(d / "train")[b"filenames"][1]  # Python 2 strings come back as bytes
    assert name == (b"img_1.png" if writer == "python2" else "img_1.png")


class _Planted:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("level", ["structure", "none"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.open", "builtins.eval"])
def test_a_planted_cifar_pickle_runs_nothing_whatever_the_verification_level(tmp_path, level, payload):
    root = write_cifar(tmp_path / "data")
    marker = tmp_path / "PWNED"
    call = {"os.system": (os.system, f"touch {marker}"), "builtins.open": (open, str(marker), "w"),
            "builtins.eval": (eval, f"open({str(marker)!r}, 'w')")}[payload]
    doc = {b"data": np.zeros((300, 3072), np.uint8), b"fine_labels": [0] * 300, b"x": _Planted(*call)}
    (root / "cifar-100-python" / "train").write_bytes(pickle.dumps(doc, protocol=2))
    with pytest.raises(DatasetError, match=rf"train is not a CIFAR-100 python pickle .*{payload.split('.')[1]}") as e:
        cifar.cifar100_cil(root, verify_level=level, image_size=32)
    assert not marker.exists()
    assert "verify" not in str(e.value) and "re-download" in str(e.value).lower()


def test_object_arrays_are_refused(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "train").write_bytes(pickle.dumps({b"data": np.array([1, "a"], dtype=object)}, protocol=2))
    with pytest.raises(DatasetError, match="object dtype"):
        cifar.read_cifar100(tmp_path, "train")


def test_checksum_mismatch_says_what_to_redownload_never_to_turn_checks_off(tmp_path):
    root = write_cifar(tmp_path)
    with pytest.raises(DatasetError) as e:  # the release's checksums do not match these tiny pickles
        cifar.cifar100_cil(root)
    msg = str(e.value)
    assert "re-download" in msg and "cifar-100-python.tar.gz" in msg and "cifar-100-python/train" in msg
    assert "verify" not in msg and "skip" not in msg
