"""Visualized-BGE as FlagEmbedding's ``Visualized_BGE.encode`` computes it, in float32: the family's
independent reference (``bgevl.reference`` says what makes a reference independent).

It works on the raw state dict read with ``torch.load(weights_only=True)`` and the text model's
``config.json``, with mechanics deliberately different from ``modeling.py`` (what the export
traces): fused q/k/v with FE's ``cat(q_bias, 0, v_bias)`` bias, einsum attention, the rotary
``rotate_half`` as a signed permutation matrix, position ids built in Python (fairseq's
``make_positions`` for XLM-R), hand-written BERT layers with exact-erf GELU, the rope tables of
the last block as FE's shared module ends up holding them. Its image transform is written here
again from FE's ``image_transform`` (Pillow; torchvision is not installable beside this torch).

Source (FlagOpen/FlagEmbedding @7ed43d6, ``research/visual_bge/visual_bge/``): ``modeling.py``
(``encode``, ``encode_text``, ``encode_mm``, ``encode_image``, ``get_extended_attention_mask``),
``eva_clip/eva_vit_model.py`` (``Attention.forward``, ``Block``, ``SwiGLU``,
``EVAVisionTransformer.forward_features``), ``eva_clip/rope.py`` (``VisionRotaryEmbeddingFast``),
``eva_clip/transform.py`` (``image_transform``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from bgevl.core.family import Original, Request

if TYPE_CHECKING:  # pragma: no cover  (types only)
    from bgevl.core.probes import ProbeSet

FP16_MIN = torch.finfo(torch.float16).min


def _rotate_half_matrix(d: int) -> torch.Tensor:
    """M with (t @ M) == rotate_half(t): out[2i] = -t[2i+1], out[2i+1] = t[2i]."""
    m = torch.zeros(d, d)
    for i in range(d // 2):
        m[2 * i + 1, 2 * i] = -1.0
        m[2 * i, 2 * i + 1] = 1.0
    return m


class VisualizedBGEReference:
    """The computation of FE's ``Visualized_BGE`` on a raw state dict (torch tensors in, torch tensors out)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], text_config: dict[str, Any], tokenizer: Any = None):
        self.sd = {k: v.float() for k, v in state_dict.items()}
        self.tc = text_config
        self.tokenizer = tokenizer
        self.kind = text_config["model_type"]
        p = "model_visual.visual."
        self.depth = 1 + max(int(k[len(p) + 7:].split(".")[0]) for k in self.sd if k.startswith(p + "blocks."))
        # FE: one shared rope module; its buffer ends up holding the LAST loaded copy (blocks.{L-1})
        last = f"{p}blocks.{self.depth - 1}.attn.rope."
        self.freqs_cos, self.freqs_sin = self.sd[last + "freqs_cos"], self.sd[last + "freqs_sin"]
        self.head_dim = self.freqs_cos.shape[-1]
        self.width = self.sd[p + "pos_embed"].shape[-1]
        self.patch = self.sd[p + "patch_embed.proj.weight"].shape[-1]
        self.rot = _rotate_half_matrix(self.head_dim)
        self.rope_calls: list[tuple[int, ...]] = []   # shapes seen by the rotary (tests: patch tokens only)

    @classmethod
    def from_files(cls, pth: str | os.PathLike[str], text_dir: str | os.PathLike[str],
                   tokenizer: Any = None) -> "VisualizedBGEReference":
        sd = torch.load(pth, map_location="cpu", weights_only=True)
        cfg = json.loads((Path(text_dir) / "config.json").read_text())
        return cls(sd, cfg, tokenizer)

    # -------------------------------------------------------------------------------------------- EVA
    def _rope(self, t: torch.Tensor) -> torch.Tensor:
        self.rope_calls.append(tuple(t.shape))
        return t * self.freqs_cos + (t @ self.rot) * self.freqs_sin

    def eva_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """EVAVisionTransformer.forward(return_all_features=True), eval: [B, 1+N, C] (no final norm)."""
        W, p, eps = self.sd, "model_visual.visual.", 1e-6
        x = F.conv2d(images.float(), W[p + "patch_embed.proj.weight"], W[p + "patch_embed.proj.bias"],
                     stride=self.patch)
        x = x.flatten(2).transpose(1, 2)
        B, C = x.shape[0], self.width
        x = torch.cat((W[p + "cls_token"].expand(B, -1, -1), x), dim=1) + W[p + "pos_embed"]
        nh = C // self.head_dim
        scale = self.head_dim ** -0.5
        for i in range(self.depth):
            b = f"{p}blocks.{i}."
            h = F.layer_norm(x, (C,), W[b + "norm1.weight"], W[b + "norm1.bias"], eps)
            qkv_w = torch.cat((W[b + "attn.q_proj.weight"], W[b + "attn.k_proj.weight"], W[b + "attn.v_proj.weight"]))
            qkv_b = torch.cat((W[b + "attn.q_bias"], torch.zeros_like(W[b + "attn.v_bias"]), W[b + "attn.v_bias"]))
            N = h.shape[1]
            qkv = F.linear(h, qkv_w, qkv_b).reshape(B, N, 3, nh, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            q = torch.cat((q[:, :, :1], self._rope(q[:, :, 1:])), dim=-2)
            k = torch.cat((k[:, :, :1], self._rope(k[:, :, 1:])), dim=-2)
            attn = torch.einsum("bhqd,bhkd->bhqk", q * scale, k).softmax(dim=-1)
            o = torch.einsum("bhqk,bhkd->bhqd", attn, v).transpose(1, 2).reshape(B, N, -1)
            o = F.layer_norm(o, (o.shape[-1],), W[b + "attn.inner_attn_ln.weight"], W[b + "attn.inner_attn_ln.bias"], eps)
            x = x + F.linear(o, W[b + "attn.proj.weight"], W[b + "attn.proj.bias"])
            h = F.layer_norm(x, (C,), W[b + "norm2.weight"], W[b + "norm2.bias"], eps)
            h = F.silu(F.linear(h, W[b + "mlp.w1.weight"], W[b + "mlp.w1.bias"])) * \
                F.linear(h, W[b + "mlp.w2.weight"], W[b + "mlp.w2.bias"])
            h = F.layer_norm(h, (h.shape[-1],), W[b + "mlp.ffn_ln.weight"], W[b + "mlp.ffn_ln.bias"], eps)
            x = x + F.linear(h, W[b + "mlp.w3.weight"], W[b + "mlp.w3.bias"])
        return x

    # -------------------------------------------------------------------------------------------- BERT
    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.sd[name + ".weight"], self.sd[name + ".bias"],
                            self.tc["layer_norm_eps"])

    def _embeddings(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        W = self.sd
        e = W["bge_embeddings.word_embeddings.weight"][input_ids]
        e = e + W["bge_embeddings.token_type_embeddings.weight"][0]          # token_type_ids = zeros
        e = e + W["bge_embeddings.position_embeddings.weight"][position_ids]
        return self._ln(e, "bge_embeddings.LayerNorm")

    def _encoder(self, h: torch.Tensor, attention_mask_01: torch.Tensor) -> torch.Tensor:
        assert self.tc.get("hidden_act", "gelu") == "gelu", "reference implements exact-erf GELU only"
        # FE get_extended_attention_mask: (1 - m) * finfo(fp16).min, cast to the model dtype (fp32)
        ext = (1.0 - attention_mask_01[:, None, None, :].to(torch.float16)) * FP16_MIN
        ext = ext.float()
        W, nh = self.sd, self.tc["num_attention_heads"]
        B, S, C = h.shape
        d = C // nh
        for i in range(self.tc["num_hidden_layers"]):
            p = f"bge_encoder.layer.{i}."
            q, k, v = (F.linear(h, W[p + f"attention.self.{m}.weight"], W[p + f"attention.self.{m}.bias"])
                       .reshape(B, S, nh, d) for m in ("query", "key", "value"))
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + ext
            ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, C)
            h = self._ln(F.linear(ctx, W[p + "attention.output.dense.weight"], W[p + "attention.output.dense.bias"]) + h,
                         p + "attention.output.LayerNorm")
            inter = F.gelu(F.linear(h, W[p + "intermediate.dense.weight"], W[p + "intermediate.dense.bias"]))
            h = self._ln(F.linear(inter, W[p + "output.dense.weight"], W[p + "output.dense.bias"]) + h,
                         p + "output.LayerNorm")
        return h

    # -------------------------------------------------------------------------------------------- paths
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """FE encode_text: the plain text model (default position ids), CLS, L2."""
        B, T = input_ids.shape
        if self.kind in ("xlm-roberta", "roberta"):
            pad = self.tc["pad_token_id"]
            pos = []
            for row in input_ids.tolist():   # fairseq make_positions: non-pad tokens count from pad+1
                c, r = 0, []
                for tok in row:
                    c += tok != pad
                    r.append(c + pad if tok != pad else pad)
                pos.append(r)
            position_ids = torch.tensor(pos)
        else:
            position_ids = torch.arange(T)
        h = self._encoder(self._embeddings(input_ids, position_ids), attention_mask)
        return F.normalize(h[:, 0], dim=-1)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.eva_tokens(images)[:, 1:]     # EVA CLS not used
        return F.linear(x, self.sd["visual_proj.weight"], self.sd["visual_proj.bias"])

    def encode_mm(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        W = self.sd
        img = self.image_tokens(images)
        B, N, _ = img.shape
        img = img + W["bge_embeddings.position_embeddings.weight"][torch.arange(1, 1 + N)]
        img = self._ln(img, "bge_embeddings.LayerNorm")
        T = input_ids.shape[1]
        prompt_pos = torch.cat([torch.tensor([0]), torch.arange(1 + N, 1 + N + T - 1)])
        txt = self._embeddings(input_ids, prompt_pos)
        seq = torch.cat([txt[:, 0:1], img, txt[:, 1:]], dim=1)
        mask = torch.cat([torch.ones(B, N, dtype=attention_mask.dtype), attention_mask], dim=1)
        h = self._encoder(seq, mask)
        return F.normalize(h[:, 0], dim=-1)

    def encode_image(self, images: torch.Tensor, prompt_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
        """FE encode_image: encode_mm with the prompt "" ([CLS][SEP]) for every image."""
        B = images.shape[0]
        if prompt_ids is None:
            t = self.tokenizer([""] * B, return_tensors="pt", padding=True)
            ids, mask = t["input_ids"], t["attention_mask"]
        else:
            ids = torch.tensor([list(prompt_ids)] * B)
            mask = torch.ones_like(ids)
        return self.encode_mm(images, ids, mask)

    def _tok(self, text: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``text``: texts, or a tokenizer's output (a dict or ``BatchEncoding``) passed through."""
        if isinstance(text, dict) or hasattr(text, "keys"):
            return text["input_ids"], text["attention_mask"]
        t = self.tokenizer(text, return_tensors="pt", padding=True)   # FE: padding=True, no truncation
        return t["input_ids"], t["attention_mask"]

    @torch.no_grad()
    def encode(self, images: Optional[torch.Tensor] = None, text: Any = None) -> Optional[torch.Tensor]:
        """FE Visualized_BGE.encode: image-only, text-only or composed (image + text); None if neither."""
        if images is not None:
            if text is not None:
                return self.encode_mm(images, *self._tok(text))
            return self.encode_image(images)
        if text is not None:
            return self.encode_text(*self._tok(text))
        return None


def _fe_image_transform(image: Image.Image, size: int) -> torch.Tensor:
    """FE ``image_transform(is_train=False)``: Resize(size, bicubic) of the shorter side, CenterCrop(size)
    with torchvision's rounding, convert("RGB"), ToTensor, Normalize(OpenAI mean/std)."""
    width, height = image.size
    new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if new != (width, height):
        image = image.resize(new, Image.Resampling.BICUBIC)  # = Image.BICUBIC (not in Pillow's types)
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    return (x - mean) / std


class OriginalVisualized(Original):
    """``Visualized_BGE.encode(image=..., text=...)`` in float32 on a checkpoint (``.pth`` + text model files)."""

    DESCRIPTION = ("the original's embeddings in fp32 (bgevl.families.visualized.reference.OriginalVisualized: the .pth "
                   "read with torch.load(weights_only=True), FE's Visualized_BGE encode/encode_mm/encode_text "
                   "re-implemented on the raw tensors, FE's EVA-CLIP image transform)")

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        from bgevl.families.visualized.checkpoint import locate

        files = locate(path)
        tokenizer = AutoTokenizer.from_pretrained(str(files.text_dir))  # FE: AutoTokenizer(model_name_bge)
        self.model = VisualizedBGEReference.from_files(files.weights, files.text_dir, tokenizer)
        self.image_size = self.model.patch * math.isqrt(self.model.sd["model_visual.visual.pos_embed"].shape[1] - 1)

    def _images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([_fe_image_transform(im, self.image_size) for im in images])

    def encode(self, images: Sequence[Image.Image] | None = None, text: Sequence[str] | None = None) -> NDArray[Any]:
        pixels = self._images(images) if images is not None else None
        out = self.model.encode(pixels, list(text) if text is not None else None)
        if out is None:
            raise ValueError("nothing to encode: pass images, text or both")
        return out.numpy().astype(np.float32)

    def embed(self, request: Request) -> NDArray[Any]:
        return self.encode(request.images, request.texts)

    def probe_embeddings(self, probes: ProbeSet) -> dict[str, NDArray[Any]]:
        return {"images": self.encode(images=probes.images), "texts": self.encode(text=probes.texts),
                "composed": self.encode(images=probes.composed_images(), text=probes.composed_texts())}
