"""VR-LwF: Learning without Forgetting via Replayed Vocabulary.

Paper: Ding et al., "Don't Stop Learning: Towards Continual Learning for the CLIP Model" (arXiv 2207.09248, 2022);
no official code. We follow the re-implementation the field compares against, ZSCL's LwF-VR (Zheng et al., ICCV 2023;
Thunderbeee/ZSCL ``mtil/scripts/lwf_vr.sh``, ``mtil/src/models/finetune.py``, ``helpers.py::virtual_vocab``):

- replayed vocabulary: 1000 pseudo-sentences ``[SOS] + 10 token ids ~ U[0, vocab_size) + [EOS]``, drawn ONCE per run;
- teacher = the model before the current task (zero-shot CLIP for the first), frozen;
- logits against the TEACHER's vocabulary features on both sides, ``ℓ_s = scale·f_student(x)·g_teacher(V)ᵀ`` and
  ``ℓ_t = scale·f_teacher(x)·g_teacher(V)ᵀ``; distillation ``CE(ℓ_s/T, softmax(ℓ_t/T))·T²`` (T = 2) image→text
  and text→image (transposed), weight 1 each; total = CE(class logits, y; label smoothing 0.2) + both terms;
- whole model trained except ``logit_scale``; AdamW (wd 0), cosine with 100 warm-up steps, 1000 iterations per task.

Deliberate deviations (exact or cheaper unless said):
- The pseudo-sentences bypass the tokenizer: token rows are built directly and run through
  ``Clip.token_embedding`` + ``Clip.text_forward`` on ``length + 2`` positions (padding trimmed: exact under the
  causal mask). We pool at the [EOS] we placed; ZSCL pools at ``argmax(token id)``, which differs only for the
  ~0.02 % of sentences where a random id equals [EOS] itself (there it pools earlier).
- ``length`` is cut to ``context_length − 2`` for short-context models (the micro-CLIP has 24), with a warning.
- The teacher's vocabulary features are computed once per task and cached (ZSCL re-encodes the constant vocabulary
  every step); the teacher keeps only a frozen copy of the image tower (ViT-B/16: +86 M parameters).
- ZSCL's reference images come from a second shuffled loader over the same training set; we distil on the
  training batch itself, reusing the student's image features (see `ctta.strategies.lwf`).
- ZSCL runs its LwF and LwF-VR baselines with ``--fair``: each task's training set is expanded with a 100-class
  ImageNet subset (50 images a class, their class names added to the head), to match ZSCL's ImageNet reference
  data. That is a property of the benchmark, not the method; we train on the task's data only.
- ``distill_scale=100.0`` (default) pins the distillation logits' scale at ZSCL's (CLIP's ``logit_scale.exp()``,
  100 for the OpenAI weights); see `ctta.strategies.lwf`. With a learned scale of ~25 (the micro-CLIP v3; v4 has 57.7)
  the teacher's softmax over 1000 similar pseudo-sentences at T = 2 is nearly uniform and the distillation barely
  pulls.
- Optional: a user word list (file, one entry a line, or a list of strings) replaces the random vocabulary, as
  WildCLIP's ``VRLwR`` does with domain anchors; ``wise_alpha`` adds WiSE-FT interpolation with the zero-shot
  weights after every task (`ctta.merging.interpolate_`). Both are off by default.

Composition: `ctta.finetuning.FineTuning` owns the trainable set, AdamW, the per-task schedule (``schedule``,
``reset_optimizer_per_task``) and the WiSE anchor; `ctta.distillation.Distillation` owns the teacher and the two
distillation terms. `VRLwF` is an `LwF` (itself a `Finetune`) with the vocabulary as its reference texts
(`reference_features`) instead of the current classes' prompts.

Note: as in ZSCL, the student's text tower gets no distillation gradient (teacher text features on both sides), so
only the image tower is protected. On the built-in world most of the zero-shot loss of whole-model training comes
from text-tower drift; there ``params="visual."`` is where VR-LwF's distillation shows (experiment world_cl_visual/vr_lwf).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ctta.distillation import encode_frozen
from ctta.model import Clip
from ctta.stream import LabelSpace
from ctta.strategies.lwf import LwF


def random_vocabulary(n: int, length: int, vocab_size: int, sot: int, eot: int, seed: int = 0) -> Tensor:
    """``[n, length + 2]`` token rows ``[sot, t_1..t_length, eot]`` with ``t_i ~ U[0, vocab_size)`` (specials included,
    as ZSCL's ``virtual_vocab``), from a private generator seeded by ``seed``: same seed, same vocabulary."""
    if n <= 0 or length <= 0 or vocab_size <= 0:
        raise ValueError(f"random vocabulary needs positive n, length and vocab_size, got {n}, {length}, {vocab_size}")
    g = torch.Generator().manual_seed(int(seed))
    body = torch.randint(0, vocab_size, (n, length), generator=g)
    return torch.cat([torch.full((n, 1), sot), body, torch.full((n, 1), eot)], dim=1)


def special_tokens(model: Clip) -> tuple[int, int]:
    """(start, end) token ids of the model's tokenizer: open_clip's attributes, else the two tokens of ``""``."""
    tok = model.tokenizer
    sot, eot = getattr(tok, "sot_token_id", None), getattr(tok, "eot_token_id", None)
    if sot is None or eot is None:
        row = tok([""])[0]
        sot, eot = int(row[0]), int(row[1])
    return int(sot), int(eot)


def read_words(words: str | Path | Sequence[str]) -> list[str]:
    """A word list: a file (one entry a line, blank lines skipped) or a sequence of strings."""
    if isinstance(words, (str, Path)):
        path = Path(words)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} does not exist (pass a list for literal words)")
        words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
        words = [w for w in words if w]
        if not words:
            raise ValueError(f"vocabulary file {path} has no entries")
        return words
    out = list(words)
    if not out or any(not isinstance(w, str) or not w.strip() for w in out):
        raise ValueError("a vocabulary list must hold non-empty strings")
    return out


class VRLwF(LwF):
    """LwF distilled through a replayed (random pseudo-sentence) vocabulary; see the module docstring. It is LwF
    with other reference texts: the vocabulary instead of the current classes' prompts."""

    teacher_per_space = False  # the vocabulary does not depend on the label space

    def __init__(self, params: str | Iterable[str] = "", *, vocabulary: str | Path | Sequence[str] | None = None,
                 n_sentences: int = 1000, length: int = 10, vocab_seed: int = 0, lr: float = 1e-5,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup: int = 100,
                 schedule: str = "cosine", reset_optimizer_per_task: bool = True, label_smoothing: float = 0.2,
                 temperature: float = 2.0, image_loss: float = 1.0, text_loss: float = 1.0,
                 distill_scale: float | None = 100.0, wise_alpha: float | None = None, batch_size: int = 64,
                 epochs: int = 1, iterations: int | None = 1000, grad_clip: float | None = None, amp: bool = False):
        if n_sentences <= 0 or length <= 0:
            raise ValueError(f"n_sentences and length must be positive, got {n_sentences}, {length}")
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, warmup=warmup, schedule=schedule,
                         reset_optimizer_per_task=reset_optimizer_per_task, label_smoothing=label_smoothing,
                         temperature=temperature, image_loss=image_loss, text_loss=text_loss,
                         distill_scale=distill_scale, wise_alpha=wise_alpha, batch_size=batch_size, epochs=epochs,
                         iterations=iterations, grad_clip=grad_clip, amp=amp)
        self.words = read_words(vocabulary) if vocabulary is not None else None
        self.n_sentences, self.length, self.vocab_seed = int(n_sentences), int(length), int(vocab_seed)
        self.tokens: Tensor | None = None  # [n, length + 2] pseudo-sentences (random vocabulary only)
        self.vocab_encodes = 0  # how many times the vocabulary was encoded (once per task)

    # ----------------------------------------------------------------------------------------- lifecycle
    def setup(self, model: Clip) -> None:
        super().setup(model)
        if self.words is None:
            self.tokens = self._draw_vocabulary(model)

    def _draw_vocabulary(self, model: Clip) -> Tensor:
        context = model._text.positional_embedding.shape[0]
        length = self.length
        if length + 2 > context:
            length = context - 2
            warnings.warn(f"VR-LwF: pseudo-sentence length {self.length} does not fit the model's context of "
                          f"{context} tokens; using {length}")
        if length <= 0:
            raise ValueError(f"the model's text context ({context}) is too short for pseudo-sentences")
        sot, eot = special_tokens(model)
        vocab_size = model.token_embedding.num_embeddings
        return random_vocabulary(self.n_sentences, length, vocab_size, sot, eot, self.vocab_seed)

    def reference_features(self, model: Clip, space: LabelSpace) -> Tensor:
        return self.encode_vocabulary(model)

    def encode_vocabulary(self, model: Clip) -> Tensor:
        """Text features ``[V, D]`` of the replayed vocabulary under ``model`` (no grad, eval mode)."""
        self.vocab_encodes += 1
        if self.words is not None:
            return encode_frozen(model, model.encode_text, self.words)
        tokens = self.tokens.to(model.device)
        eot = torch.full((len(tokens),), tokens.shape[1] - 1, device=model.device)  # every row ends with [EOS]
        return encode_frozen(model, lambda rows: model.text_forward(model.token_embedding(rows), eot[:len(rows)]),
                             tokens)
