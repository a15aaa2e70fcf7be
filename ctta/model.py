"""`Clip`: the one shared CLIP model every strategy updates.

Wraps an open_clip network with its tokenizer and normalisation. Images enter as float tensors in [0, 1]
(`ctta.data` convention) and are normalised here. Text heads (template-averaged class embeddings) are cached
per prompt set while the text tower's weights are unchanged; the cache keys on the identity and in-place version
counter of every text parameter, so an optimizer step, a ``load_state_dict`` or a LoRA merge invalidates it.

BatchNorm (convolutional image towers such as open_clip's ``ModifiedResNet``, CLIP RN50/RN101) is given one
semantics here, at construction (`ctta.batchnorm`): a BatchNorm whose affine parameters are frozen uses and keeps
its running statistics whoever calls ``.train()``; one whose parameters train (full fine-tuning) behaves as
standard BatchNorm; `Clip.batch_statistics` switches the image tower to batch statistics (TENT). Snapshots
(`Clip.trainable_state`) carry the running statistics of the trainable BatchNorms with their parameters.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta import batchnorm
from ctta.data import check_images, is_pil_image, pil_to_rgb
from ctta.files import refused_global
from ctta.stream import LabelSpace
from ctta.weights import (ASSETS, BUILTIN_ARCH, BUILTIN_WEIGHTS, check_text_config,  # noqa: F401 (re-exported)
                          check_text_tower, file_sha256, register_builtin, resolve_quick_gelu, verify_weights_file)
from ctta.weights import WeightsFileError
from ctta.weights import is_path as _is_path

_HEAD_CHUNK = 64  # prompts per text-tower forward when building heads: one fixed shape (`Clip._encode_fixed_shape`)

# Bumped whenever any module in the process registers a parameter or a submodule (``setattr``, ``add_module``,
# ``register_parameter``: how LoRA injection and parametrizations change a tower). `Clip` caches its list of text
# parameters between bumps: walking ``named_parameters`` on every `Clip.text_head` call cost ~1 ms a sample on the
# micro-CLIP, a third of single-view TDA's whole per-sample cost.
_structure_epoch = 0


def _structure_changed(*_args) -> None:
    global _structure_epoch
    _structure_epoch += 1


nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
nn.modules.module.register_module_module_registration_hook(_structure_changed)
nn.modules.module.register_module_buffer_registration_hook(_structure_changed)  # e.g. a BatchNorm's stats set to None


class Clip(nn.Module):
    """An open_clip network plus tokenizer, normalisation and a text-head cache."""

    def __init__(self, net: nn.Module, tokenizer: Callable, *, mean: Sequence[float], std: Sequence[float],
                 source: dict | None = None):
        super().__init__()
        self.net = net
        batchnorm.install(net)  # frozen BatchNorms keep their running statistics even in train mode
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        size = net.visual.image_size
        self.image_size: int = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.source = dict(source or {})
        check_text_tower(net, str(self.source.get("arch", type(net).__name__)))  # before any work on it
        self._text = net.text if hasattr(net, "text") else net  # standard CLIP keeps text parts on net itself
        self._head_cache: dict[tuple, Tensor] = {}
        self._head_key: tuple | None = None
        self._tokens: dict[str, Tensor] = {}
        self._text_params: tuple[int, list[nn.Parameter]] | None = None  # (structure epoch, text parameters)
        self._stacked: dict[str, Tensor] = {}  # label-space fingerprint -> its [C, D] head, for the current _head_key
        self._modules_list: tuple[int, list[nn.Module]] | None = None  # (structure epoch, self.modules())
        self._state_tensors: tuple[int, dict[str, Tensor]] | None = None  # (structure epoch, state_tensors())
        self.freeze()  # nothing trains until a strategy says so
        self.eval()  # and the whole module, not only the net, starts in eval mode (a training strategy sets train)

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, arch: str, pretrained: str | Path | None, *, device: str | torch.device = "cpu",
                        quick_gelu: bool | None = None) -> "Clip":
        """Any open_clip architecture with a pretrained tag (downloaded by open_clip), a local checkpoint path,
        or ``None`` for random weights. ``("micro-clip", "builtin")`` is the embedded default."""
        if arch == BUILTIN_ARCH:
            register_builtin()
            if pretrained == "builtin":
                if not BUILTIN_WEIGHTS.exists():
                    raise FileNotFoundError(f"embedded weights missing at {BUILTIN_WEIGHTS}; rebuild them with "
                                            "`python scripts/pretrain_micro.py`")
                pretrained = BUILTIN_WEIGHTS
        local = pretrained is not None and _is_path(pretrained)
        if local and not Path(pretrained).exists():
            raise FileNotFoundError(f"checkpoint {pretrained} does not exist")
        arch2, force = resolve_quick_gelu(arch, None if pretrained is None else str(pretrained))
        force = force or bool(quick_gelu)
        check_text_config(arch2)  # an unsupported text tower is refused before any download
        digest = verify_weights_file(pretrained) if local else None  # damaged / hash mismatch: refused here
        with warnings.catch_warnings():  # our own guard above has already handled QuickGELU
            warnings.filterwarnings("ignore", message=".*QuickGELU.*")
            try:
                net = open_clip.create_model(arch2, pretrained=None if pretrained is None else str(pretrained),
                                             device=device, force_quick_gelu=force)
            except pickle.UnpicklingError as e:
                raise WeightsFileError(
                    f"{pretrained} is not a plain weights file: reading it would import or run what it names "
                    f"({refused_global(e)}), which ctta never does; use a .safetensors file or a state dict saved "
                    "with torch.save") from None
            except RuntimeError as e:
                if not local or "state_dict" not in str(e):
                    raise
                detail = " ".join(str(e).split())
                raise WeightsFileError(f"{pretrained} does not fit the {arch2} architecture: "
                                       f"{detail[:300]}{'...' if len(detail) > 300 else ''}") from None
        source = {"arch": arch2, "pretrained": None if pretrained is None else str(pretrained),
                  "quick_gelu": force or bool((open_clip.get_model_config(arch2) or {}).get("quick_gelu"))}
        if local:
            source["checkpoint_sha256"] = digest
        if pretrained is not None and not local:
            pcfg = open_clip.get_pretrained_cfg(arch, str(pretrained))
        else:
            pcfg = {}
        mean = pcfg.get("mean", getattr(net.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        std = pcfg.get("std", getattr(net.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        return cls(net.eval(), open_clip.get_tokenizer(arch2), mean=mean, std=std, source=source).to(device)

    @classmethod
    def from_config(cls, config: dict, *, name: str = "custom", checkpoint: str | Path | None = None,
                    device: str | torch.device = "cpu") -> "Clip":
        """Build from an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config)
        if missing:
            raise ValueError(f"open_clip model config lacks {sorted(missing)}")
        open_clip.factory._MODEL_CONFIGS[name] = json.loads(json.dumps(config))  # the registry open_clip reads
        return cls.from_pretrained(name, checkpoint, device=device)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def provenance(self) -> dict:
        return dict(self.source)

    # ----------------------------------------------------------------------------------------- image side
    def normalize(self, images: Tensor) -> Tensor:
        check_images(images)
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} for this model, got "
                             f"{tuple(images.shape[-2:])}; resize them (Clip.preprocess does it for PIL images)")
        return (images.to(self.device, torch.float32) - self.mean) / self.std

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image features ``[B, D]`` of images in [0, 1]."""
        return F.normalize(self.net.encode_image(self.normalize(images)).float(), dim=-1)

    def preprocess(self, image) -> Tensor:
        """A PIL image of any mode (converted by `ctta.data.pil_to_rgb`) or a ``[3, H, W]`` float tensor in
        [0, 1] to the model's eval input: shorter side resized to ``image_size`` (bicubic), centre crop."""
        from torchvision.transforms import v2 as T
        x = pil_to_rgb(image) if is_pil_image(image) else image
        check_images(x[None] if isinstance(x, Tensor) and x.dim() == 3 else x, what="image")
        x = T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(x.float())
        return T.CenterCrop(self.image_size)(x).clamp_(0, 1)

    # ----------------------------------------------------------------------------------------- text side
    @property
    def token_embedding(self) -> nn.Embedding:
        return self._text.token_embedding

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``[N, context_length]`` (memoised per string: prompts repeat across heads and steps)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._tokens]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self._tokens[t] = row
        return torch.stack([self._tokens[t] for t in texts]).to(self.device)

    def eot_positions(self, tokens: Tensor) -> Tensor:
        """Position of the pooled token of each row (the end-of-text token for CLIP's argmax pooling)."""
        pool = getattr(self._text, "text_pool_type", getattr(self._text, "pool_type", "argmax"))
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos":
            eos = getattr(self._text, "text_eos_id", getattr(self._text, "eos_id", None))
            return (tokens == eos).int().argmax(dim=-1)
        raise NotImplementedError(f"text pooling {pool!r} is not supported by the trimmed text forward")

    def text_forward(self, embeddings: Tensor, eot: Tensor) -> Tensor:
        """Run the text transformer on token embeddings ``[N, L, W]`` (``L`` ≤ context length) and pool at
        ``eot``. CLIP's text tower is causally masked, so positions after the end-of-text token cannot influence
        the pooled feature: running on the first ``L`` positions is exact (padding trimmed). L2-normalised."""
        t = self._text
        if getattr(t, "cls_emb", None) is not None:
            raise NotImplementedError("text towers with a CLS embedding (CoCa) are not supported")
        L = embeddings.shape[1]
        cast = t.transformer.get_cast_dtype()
        x = embeddings.to(cast) + t.positional_embedding[:L].to(cast)
        x = t.transformer(x, attn_mask=t.attn_mask[:L, :L])
        x = t.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = t.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    def encode_text(self, texts: Sequence[str], *, trim: bool = True) -> Tensor:
        """L2-normalised text features ``[N, D]`` (gradients flow if the text tower is trainable)."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenize(texts)
        eot = self.eot_positions(tokens)
        if trim:
            tokens = tokens[:, : int(eot.max()) + 1]
        return self.text_forward(self.token_embedding(tokens), eot)

    def text_parameters(self) -> list[nn.Parameter]:
        if self._text_params is None or self._text_params[0] != _structure_epoch:
            params = [p for n, p in self.net.named_parameters() if not n.startswith("visual.") and "logit_" not in n]
            self._text_params = (_structure_epoch, params)
        return list(self._text_params[1])

    def _text_version(self) -> tuple:
        self.text_parameters()  # refreshes the list if any module changed shape since
        return tuple((id(p), p._version) for p in self._text_params[1])

    def invalidate_text_cache(self) -> None:
        self._head_cache.clear()
        self._stacked.clear()

    def _encode_fixed_shape(self, prompts: Sequence[str]) -> Tensor:
        """`encode_text` of ``prompts`` in forwards of one fixed shape: prompts grouped by token length, each group
        run trimmed to that length in chunks of exactly ``_HEAD_CHUNK`` rows (the last chunk padded with copies of its
        last prompt). A forward's floats depend on its shape (the trimmed length and the row count select the matmul
        kernels: ~1e-7 apart); with the shape fixed they do not depend on the other rows (measured on this project's
        CPU machine; tests/test_model.py checks it wherever the suite runs). So a prompt's feature is a function of the
        prompt alone, never of the classes it happened to be encoded with. The per-class head cache relies on that: a
        head built task by task equals one built at once, so a resumed run predicts exactly as the uninterrupted one."""
        tokens = self.tokenize(prompts)
        eot = self.eot_positions(tokens)
        out: Tensor | None = None
        for length in eot.unique().tolist():
            for chunk in (eot == length).nonzero().flatten().split(_HEAD_CHUNK):
                rows = torch.cat([chunk, chunk[-1:].expand(_HEAD_CHUNK - len(chunk))])
                f = self.text_forward(self.token_embedding(tokens[rows, : length + 1]), eot[rows])[: len(chunk)]
                if out is None:
                    out = f.new_empty(len(prompts), f.shape[1])
                out[chunk] = f
        assert out is not None, "no prompts"
        return out

    @torch.no_grad()
    def text_head(self, space: LabelSpace) -> Tensor:
        """Class embeddings ``[C, D]``: per class, the normalised mean of its normalised template embeddings.
        Cached per (class name, templates) while the text tower's weights are unchanged, and the stacked head per
        label space; each call returns its own copy (a caller may change it in place)."""
        key = self._text_version()
        if key != self._head_key:
            self._head_cache.clear()
            self._stacked.clear()
            self._head_key = key
        head = self._stacked.get(space.fingerprint)
        if head is not None:  # the common case, every call of a stream over one label space
            return head.clone()
        keys = list(zip(space.classnames, space.class_templates))
        todo = [k for k in dict.fromkeys(keys) if k not in self._head_cache]
        if todo:
            prompts = [t.replace("{}", c) for c, temps in todo for t in temps]
            with self.eval_mode():
                feats = self._encode_fixed_shape(prompts)
            i = 0
            for k in todo:
                n = len(k[1])
                self._head_cache[k] = F.normalize(feats[i:i + n].mean(0), dim=-1)
                i += n
        head = torch.stack([self._head_cache[k] for k in keys])
        if len(self._stacked) >= 64:  # a bound for callers that pass many label spaces (class subsets)
            self._stacked.clear()
        self._stacked[space.fingerprint] = head
        return head.clone()

    # ----------------------------------------------------------------------------------------- scoring
    @property
    def logit_scale(self) -> Tensor:
        return self.net.logit_scale.exp()

    def logits(self, image_features: Tensor, head: Tensor) -> Tensor:
        """``exp(logit_scale) · image_features @ head.T`` (+ logit_bias for SigLIP-style models)."""
        out = self.logit_scale * image_features @ head.t()
        bias = getattr(self.net, "logit_bias", None)
        return out + bias if bias is not None else out

    @torch.no_grad()
    def zero_shot(self, images: Tensor, space: LabelSpace) -> Tensor:
        """Zero-shot logits ``[B, len(space)]`` of the model as it is, in eval mode (its mode is restored after)."""
        with self.eval_mode():
            return self.logits(self.encode_image(images), self.text_head(space))

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode inside the block, and every submodule back in the mode it had after it (a net in
        train mode under a Clip in eval mode stays so). ``eval()`` walks every submodule through
        ``nn.Module.__setattr__`` (about 1 ms on the micro-CLIP, a quarter of a one-image online prediction), so
        nothing is switched when nothing is training, the case of every prediction of a frozen model."""
        if self._modules_list is None or self._modules_list[0] != _structure_epoch:
            self._modules_list = (_structure_epoch, list(self.modules()))
        training = [m for m in self._modules_list[1] if m.training]
        if training:
            self.eval()
        try:
            yield
        finally:
            for m in training:  # what train() sets, module by module (no walk over the ones that stay in eval)
                m.training = True

    # ----------------------------------------------------------------------------------------- training state
    def freeze(self) -> None:
        """Nothing trains: every parameter frozen and every BatchNorm back on its running statistics."""
        for p in self.parameters():
            p.requires_grad_(False)
        batchnorm.set_batch_statistics(self.net, False)

    def batch_statistics(self, enabled: bool = True, prefix: str = "visual.") -> list[str]:
        """Make the BatchNorms under ``prefix`` normalise with the statistics of the current batch in every mode
        (TENT's setting), or go back to the trainability rule (``enabled=False``). Running buffers are neither
        used nor changed meanwhile. Returns the names of the layers switched (empty for a ViT tower)."""
        root = self.net.get_submodule(prefix.rstrip(".")) if prefix.strip(".") else self.net
        return [f"{prefix}{n}" for n in batchnorm.set_batch_statistics(root, enabled)]

    def unfreeze(self, select: Callable[[str, nn.Parameter], bool] | str | Iterable[str] = "") -> list[nn.Parameter]:
        """Make parameters trainable: all (``""``), those whose name starts with a prefix (or one of several),
        or those for which ``select(name, param)`` is true. ``logit_scale`` stays frozen unless named.
        A BatchNorm whose parameters become trainable uses batch statistics (and updates its running ones) in
        train mode, as in standard fine-tuning."""
        if callable(select):
            pred = select
        else:
            prefixes = (select,) if isinstance(select, str) else tuple(select)
            pred = lambda n, p: n.startswith(prefixes) and (  # noqa: E731
                "logit_" not in n or any("logit_" in q for q in prefixes))
        chosen = []
        for n, p in self.net.named_parameters():
            if pred(n, p):
                p.requires_grad_(True)
                chosen.append(p)
        if not chosen:
            raise ValueError(f"unfreeze selected no parameters (select={select!r})")
        return chosen

    def trainable_tensors(self) -> dict[str, Tensor]:
        """The live tensors a snapshot holds, by ``state_dict`` name: every trainable parameter, and the running
        statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) of every BatchNorm whose parameters
        are trainable, which training in train mode changes with them. Merging code reads it too."""
        out: dict[str, Tensor] = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        out.update(batchnorm.statistics_of_trainable(self.net))
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        """Every live tensor a snapshot may name: all parameters and every BatchNorm's running statistics. Kept
        while no parameter, buffer or module is added or replaced anywhere (an episodic adapter restores its anchor
        through it after every sample)."""
        if self._state_tensors is None or self._state_tensors[0] != _structure_epoch:
            live: dict[str, Tensor] = dict(self.net.named_parameters())
            live.update({n: b for n, b in self.net.named_buffers() if n.rsplit(".", 1)[-1] in batchnorm.STATS})
            self._state_tensors = (_structure_epoch, live)
        return self._state_tensors[1]

    def trainable_state(self) -> dict[str, Tensor]:
        """A detached copy of `trainable_tensors` (never aliases the live weights)."""
        return {n: t.detach().clone() for n, t in self.trainable_tensors().items()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Copy a snapshot back in place (the snapshot stays untouched, so it can be restored again). Any parameter
        or BatchNorm running statistic may be named, trainable now or not."""
        if not state:  # a strategy with nothing trainable (ZERO): nothing to copy
            return
        live = self.state_tensors()
        unknown = sorted(set(state) - set(live))
        if unknown:
            raise KeyError(f"snapshot has parameters the model lacks: {unknown[:5]}")
        for n, v in state.items():
            live[n].copy_(v)
