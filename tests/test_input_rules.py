"""Input rules stated and enforced (issue #15, Deliver 8): image values and PIL modes, stream sizes, unsupported
text towers, and a real-data experiment that checks its dataset before loading weights."""
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from ctta import Clip
from tests.conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- text towers
def _bidirectional_config():
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["text_cfg"]["no_causal_mask"] = True  # MobileCLIP's text tower
    return cfg


def test_text_tower_without_causal_mask_is_refused_by_name_from_the_config():
    with pytest.raises(NotImplementedError, match=r"'tiny-bidir' is not supported.*no causal mask"):
        Clip.from_config(_bidirectional_config(), name="tiny-bidir")


def test_text_tower_without_causal_mask_is_refused_when_wrapping_a_built_network():
    open_clip.factory._MODEL_CONFIGS["tiny-bidir2"] = _bidirectional_config()
    net = open_clip.create_model("tiny-bidir2", pretrained=None)
    assert net.attn_mask is None  # CLIP keeps the text tower on itself
    with pytest.raises(NotImplementedError, match="no causal mask"):
        Clip(net, open_clip.get_tokenizer("tiny-bidir2"), mean=(0.5,) * 3, std=(0.5,) * 3,
             source={"arch": "tiny-bidir2"})


def test_mobileclip_configs_are_refused_before_any_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(NotImplementedError, match=r"'MobileCLIP-S1' is not supported.*no causal mask"):
        Clip.from_pretrained("MobileCLIP-S1", "datacompdr")


def test_causal_text_towers_still_build(tiny_clip):
    assert tiny_clip.encode_text(["a dog."]).shape == (1, 32)
