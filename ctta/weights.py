"""What `ctta.Clip` checks before it builds a network: the weights file and the architecture.

- **Weights files**: a local ``.safetensors`` file must be internally consistent (header length, JSON header,
  every tensor's byte range inside the file and of the size its dtype and shape need, the ranges tiling the data
  section exactly), else it is refused with the reason. When a ``<stem>.meta.json`` beside it records
  ``"weights_sha256"`` (the embedded micro-CLIP's does), the file's SHA-256 must match: a flipped byte anywhere is
  refused. `weights_sha256_entry` is the one helper a training script calls to write that key.
- **Text towers**: `Clip`'s text forward trims padding after the end-of-text token, which is exact only for
  open_clip's own `TextTransformer` with a causal mask, argmax/eos pooling and no CLS embedding. Anything else
  (MobileCLIP's bidirectional text tower, CoCa's CLS embedding, Hugging Face towers) is refused by name with the
  reason, from the config before any weights are downloaded, and from the built network in `Clip.__init__`.
- OpenAI's QuickGELU weights are matched to the activation they were trained with (`resolve_quick_gelu`).
"""
from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import open_clip
from torch import nn

from ctta.files import sha256_file

ASSETS = Path(__file__).parent / "assets"
BUILTIN_ARCH = "micro-clip"
BUILTIN_WEIGHTS = ASSETS / "micro-clip.safetensors"
WEIGHTS_SHA256_KEY = "weights_sha256"  # key of the weights' SHA-256 in <stem>.meta.json
_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                   "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
SUPPORTED_TEXT_POOLING = ("argmax", "eos")

file_sha256 = sha256_file  # the name `ctta.model` has always exported


class WeightsFileError(ValueError):
    """A local weights file is damaged or does not match the hash recorded for it."""


def register_builtin() -> None:
    """Make the embedded micro-CLIP config known to open_clip (idempotent)."""
    if BUILTIN_ARCH not in open_clip.list_models():
        open_clip.add_model_config(ASSETS / f"{BUILTIN_ARCH}.json")


def is_path(p: str | Path) -> bool:
    """Is ``pretrained`` a local file rather than an open_clip tag?"""
    return isinstance(p, Path) or "/" in str(p) or str(p).endswith((".pt", ".pth", ".bin", ".safetensors"))


# ------------------------------------------------------------------------------------------- weights files
def meta_path(weights: str | Path) -> Path:
    """``<stem>.meta.json`` beside a weights file (``micro-clip.safetensors`` → ``micro-clip.meta.json``)."""
    return Path(weights).with_suffix("").with_suffix(".meta.json")


def weights_sha256_entry(weights: str | Path) -> dict[str, str]:
    """``{"weights_sha256": <hex>}`` for a weights file: merge it into the meta written beside the file (after
    the weights themselves are written), and `verify_weights_file` will check every later load against it."""
    return {WEIGHTS_SHA256_KEY: sha256_file(weights)}


def check_safetensors(path: str | Path) -> None:
    """Refuse a ``.safetensors`` file whose header is unreadable or whose tensors' byte ranges do not tile the
    data section exactly (a truncated, extended or overwritten file)."""
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsFileError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise WeightsFileError(f"{bad}: header length {n} exceeds the file ({size} bytes); truncated or damaged")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsFileError(f"{bad}: its JSON header does not parse ({e}); the file is damaged") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{bad}: its header is not a JSON object")
    data = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            (start, end), dtype, shape = info["data_offsets"], info["dtype"], info["shape"]
            need = _ST_DTYPE_BYTES[dtype] * math.prod(int(s) for s in shape)
        except (KeyError, TypeError, ValueError):
            raise WeightsFileError(f"{bad}: tensor {name!r} has a malformed entry {info!r}") from None
        if not 0 <= start <= end <= data or end - start != need:
            raise WeightsFileError(f"{bad}: tensor {name!r} ({dtype} {shape}) claims bytes [{start}, {end}) of a "
                                   f"{data}-byte data section (needs {need}); truncated or damaged")
        spans.append((start, end))
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise WeightsFileError(f"{bad}: tensor byte ranges overlap or leave a gap at byte {pos}; damaged")
        pos = end
    if pos != data:
        raise WeightsFileError(f"{bad}: tensors cover {pos} of {data} data bytes; truncated, extended or damaged")


def verify_weights_file(path: str | Path) -> str:
    """Check a local weights file before open_clip reads it; returns its SHA-256 (recorded in provenance)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors(path)
    digest = sha256_file(path)
    meta = meta_path(path)
    if meta.is_file():
        try:
            want = json.loads(meta.read_text()).get(WEIGHTS_SHA256_KEY)
        except (json.JSONDecodeError, AttributeError):
            raise WeightsFileError(f"{meta} (the record of {path.name}) is not a JSON object; it is damaged") from None
        if want is not None and want.lower() != digest:
            raise WeightsFileError(
                f"{path} is corrupt: content hash mismatch (sha256 {digest}, {meta.name} records {want}); restore "
                f"the file from a good copy (for the embedded micro-CLIP: reinstall ctta or `git checkout` it)")
    return digest


# ------------------------------------------------------------------------------------------- architectures
def _text_problem(no_causal_mask: bool, embed_cls: bool, pool: str | None, hf: str | None) -> str | None:
    if hf:
        return (f"its text tower is the Hugging Face model {hf!r}; the trimmed text forward needs open_clip's "
                "own TextTransformer")
    if no_causal_mask:
        return ("its text tower has no causal mask (bidirectional, as in MobileCLIP): trimming the padding after "
                "the end-of-text token, which the prompt learners and the text-head cache rely on, is exact only "
                "under a causal mask")
    if embed_cls:
        return "its text tower has a CLS embedding (CoCa-style), which the trimmed text forward does not place"
    if pool is not None and pool not in SUPPORTED_TEXT_POOLING:
        return f"its text tower pools with {pool!r}; supported: {', '.join(SUPPORTED_TEXT_POOLING)}"
    return None


def _refuse(arch: str, why: str) -> None:
    raise NotImplementedError(f"open_clip architecture {arch!r} is not supported by ctta.Clip: {why}. "
                              "Choose a CLIP-style architecture (e.g. ViT-B-16, ViT-L-14, RN50, micro-clip)")


def check_text_config(arch: str) -> None:
    """Refuse an architecture whose text tower `Clip` cannot run, from its config (before any download)."""
    cfg = open_clip.get_model_config(arch)
    if not cfg:
        return  # unknown to open_clip: create_model will say so
    t = cfg.get("text_cfg", {})
    why = _text_problem(bool(t.get("no_causal_mask")), bool(t.get("embed_cls")), t.get("pool_type"),
                        t.get("hf_model_name"))
    if why:
        _refuse(arch, why)


def check_text_tower(net: nn.Module, arch: str) -> None:
    """Refuse a built network whose text tower `Clip` cannot run (the same rules, read from the modules)."""
    t = net.text if hasattr(net, "text") else net
    if not hasattr(t, "transformer") or not hasattr(t, "positional_embedding"):
        _refuse(arch, f"its text tower ({type(t).__name__}) is not open_clip's TextTransformer")
    pool = getattr(t, "text_pool_type", getattr(t, "pool_type", "argmax"))
    why = _text_problem(getattr(t, "attn_mask", None) is None, getattr(t, "cls_emb", None) is not None, pool, None)
    if why:
        _refuse(arch, why)


def resolve_quick_gelu(arch: str, pretrained: str | None) -> tuple[str, bool]:
    """Return ``(arch, force_quick_gelu)`` that matches the activation the weights were trained with.

    OpenAI's weights were trained with QuickGELU; open_clip's plain configs (``ViT-B-16``) use GELU and open_clip
    only warns on the mismatch, which silently costs accuracy. We correct it (to the ``-quickgelu`` config, or by
    forcing QuickGELU) and refuse the opposite mismatch, which cannot be corrected by the weights' owner.
    """
    if pretrained is None or is_path(pretrained):
        return arch, False
    tag_cfg = (open_clip.get_pretrained_cfg(arch, pretrained)
               or open_clip.get_pretrained_cfg(arch.removesuffix("-quickgelu"), pretrained))
    tag_qg = bool(tag_cfg.get("quick_gelu", False))
    model_qg = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if tag_qg and not model_qg:
        alt = f"{arch}-quickgelu"
        if alt in open_clip.list_models():
            warnings.warn(f"weights {arch}/{pretrained} were trained with QuickGELU: using config {alt!r}")
            return alt, False
        warnings.warn(f"weights {arch}/{pretrained} were trained with QuickGELU: forcing QuickGELU")
        return arch, True
    if model_qg and not tag_qg and tag_cfg:
        raise ValueError(f"config {arch!r} uses QuickGELU but weights {pretrained!r} were trained with GELU; "
                         f"use {arch.removesuffix('-quickgelu')!r}")
    return arch, False
