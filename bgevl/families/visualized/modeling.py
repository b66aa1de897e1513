"""Visualized-BGE (bge-visualized-base-en-v1.5 / bge-visualized-m3) as the torch modules the export traces.

Facts come from FlagOpen/FlagEmbedding `research/visual_bge` (snapshot 7ed43d6):
  - `visual_bge/modeling.py`          Visualized_BGE.encode_text / encode_mm / encode_image
  - `visual_bge/eva_clip/eva_vit_model.py`  EVAVisionTransformer, Block, Attention(subln), SwiGLU
  - `visual_bge/eva_clip/rope.py`     VisionRotaryEmbeddingFast, rotate_half
  - `visual_bge/eva_clip/model.py`    _build_vision_tower (LayerNorm eps 1e-6, head -> CLIP embed_dim)
  - `visual_bge/eva_clip/model_configs/EVA02-CLIP-{B-16,L-14}.json`
The code below is written for this project; attribute names mirror the published state-dict layout so that
`load_state_dict(strict=True)` works on `Visualized_*.pth` directly.

Two graphs are meant for export:
  VisionGraph: pixel_values [B,3,224,224] -> image_tokens [B,N,C_text]
               (EVA last block, EVA CLS dropped, no final norm/head, then visual_proj; BEFORE the text
               position embeddings / LayerNorm, which belong to the text model and live in TextGraph)
  TextGraph:   (input_ids [B,T], attention_mask [B,T], image_tokens [B,N,C]) -> L2-normalized CLS [B,C]
               N may be 0: then it is the text-only path (`encode_text`), incl. XLM-R's padding-offset positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

FP16_MIN = torch.finfo(torch.float16).min  # FE get_extended_attention_mask default dtype=torch.float16


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvaVisionConfig:
    """EVA02-CLIP vision tower geometry (FE eva_clip/model_configs/EVA02-CLIP-*.json)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_hidden: int = 2048          # int(width * 2.6667): 2048 (B), 2730 (L)
    pt_hw_seq_len: int = 16         # rope reference grid
    intp_freq: bool = True          # rope positions = arange(grid) / grid * pt_hw_seq_len
    rope_theta: float = 10000.0
    ln_eps: float = 1e-6
    clip_embed_dim: int = 512       # `head` out features (stored, unused by Visualized-BGE)

    @property
    def num_heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def base(cls) -> "EvaVisionConfig":  # EVA02-CLIP-B-16 (bge-visualized-base-en-v1.5)
        return cls()

    @classmethod
    def m3(cls) -> "EvaVisionConfig":  # EVA02-CLIP-L-14 at 224 px (bge-visualized-m3)
        return cls(patch_size=14, width=1024, layers=24, mlp_hidden=int(1024 * 2.6667), clip_embed_dim=768)

    @classmethod
    def tiny(cls, patch_size: int = 16, width: int = 64) -> "EvaVisionConfig":
        """Tiny test tower at the real 224 px geometry (patch 16 -> 196 tokens like B; 14 -> 256 like L)."""
        return cls(patch_size=patch_size, width=width, layers=2, head_width=32,
                   mlp_hidden=int(width * 2.6667), clip_embed_dim=32)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "model_visual.visual.",
                        **overrides: Any) -> "EvaVisionConfig":
        """Infer the geometry from tensor shapes (head_dim from the stored rope table width)."""
        pw = sd[prefix + "patch_embed.proj.weight"]
        n_tok = sd[prefix + "pos_embed"].shape[1]
        grid = math.isqrt(n_tok - 1)
        layers = 1 + max(int(k[len(prefix) + 7:].split(".")[0]) for k in sd if k.startswith(prefix + "blocks."))
        kw: dict[str, Any] = dict(
            image_size=grid * pw.shape[-1], patch_size=pw.shape[-1], width=pw.shape[0], layers=layers,
            head_width=sd[prefix + "rope.freqs_cos"].shape[-1],
            mlp_hidden=sd[prefix + "blocks.0.mlp.w1.weight"].shape[0],
            clip_embed_dim=sd[prefix + "head.weight"].shape[0],
        )
        kw.update(overrides)
        return cls(**kw)


def compute_rope_tables(cfg: EvaVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (freqs_cos, freqs_sin) [grid*grid, head_dim] as FE rope.py VisionRotaryEmbeddingFast builds them
    (freqs_for='lang', dim = head_dim/2 per axis, each frequency repeated twice -> interleaved pairs,
    concatenated [h-axis | w-axis]). Published checkpoints store these tables fp16-rounded; loading uses the
    stored values, this function only serves fresh models and the generator."""
    dim = cfg.head_width // 2
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    ft = cfg.grid if cfg.intp_freq else cfg.pt_hw_seq_len
    t = torch.arange(ft) / ft * cfg.pt_hw_seq_len
    f = torch.einsum("..., f -> ... f", t, freqs)
    f = f.repeat_interleave(2, dim=-1)                                   # repeat '... n -> ... (n r)', r=2
    f = torch.cat([f[:, None, :].expand(ft, ft, -1), f[None, :, :].expand(ft, ft, -1)], dim=-1)
    f = f.reshape(-1, f.shape[-1])
    return f.cos(), f.sin()


# ----------------------------------------------------------------------------------------------------------
# EVA02 vision tower
# ----------------------------------------------------------------------------------------------------------
def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) (FE rope.py rotate_half, einops-free)."""
    d = x.shape[-1]
    x = x.unflatten(-1, (d // 2, 2))  # type: ignore[no-untyped-call]  # torch leaves Tensor.unflatten unannotated
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


class EvaRope(nn.Module):
    """Shared 2D rotary table; persistent buffers -> `rope.freqs_*` and `blocks.i.attn.rope.freqs_*` keys.
    The rotation is computed in fp32 with plain elementwise ops whatever the module dtype."""

    freqs_cos: torch.Tensor  # buffers (register_buffer)
    freqs_sin: torch.Tensor

    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        cos, sin = compute_rope_tables(cfg)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: [B, H, P, Dh] (patch tokens only)
        t32 = t.float()
        out = t32 * self.freqs_cos.float() + rotate_half_interleaved(t32) * self.freqs_sin.float()
        return out.to(t.dtype)


class EvaAttention(nn.Module):
    def __init__(self, cfg: EvaVisionConfig, rope: EvaRope):
        super().__init__()
        c, h = cfg.width, cfg.num_heads
        self.num_heads, self.head_dim = h, cfg.head_width
        self.scale = cfg.head_width ** -0.5
        # registration order mirrors FE Attention (subln=True, qkv_bias=True)
        self.q_proj = nn.Linear(c, h * cfg.head_width, bias=False)
        self.k_proj = nn.Linear(c, h * cfg.head_width, bias=False)
        self.v_proj = nn.Linear(c, h * cfg.head_width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(h * cfg.head_width))
        self.v_bias = nn.Parameter(torch.zeros(h * cfg.head_width))
        self.inner_attn_ln = nn.LayerNorm(h * cfg.head_width, eps=cfg.ln_eps)
        self.proj = nn.Linear(h * cfg.head_width, c)
        self.rope = rope  # the SAME module object in every block (as in FE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight)                     # no k bias
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        # torch leaves Tensor.unflatten unannotated
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # type: ignore[no-untyped-call]
                   for t in (q, k, v))
        # rope on the patch tokens only: token 0 (EVA CLS) is left as is
        q = torch.cat((q[:, :, :1], self.rope(q[:, :, 1:])), dim=2)
        k = torch.cat((k[:, :, :1], self.rope(k[:, :, 1:])), dim=2)
        attn = torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)   # no mask
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        projected: torch.Tensor = self.proj(self.inner_attn_ln(out))
        return projected


class EvaSwiGLU(nn.Module):
    """FE SwiGLU (naiveswiglu, subln): w3(ffn_ln(silu(w1 x) * w2 x))."""

    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.w2 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.ffn_ln = nn.LayerNorm(cfg.mlp_hidden, eps=cfg.ln_eps)
        self.w3 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))
        return out


class EvaBlock(nn.Module):
    def __init__(self, cfg: EvaVisionConfig, rope: EvaRope):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = EvaAttention(cfg, rope)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = EvaSwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pre-norm, no layer scale, no drop path at eval
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class EvaPatchEmbed(nn.Module):
    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.proj(x).flatten(2).transpose(1, 2)
        return tokens


class EvaVisionTower(nn.Module):
    """EVAVisionTransformer(return_all_features=True) at eval: all tokens of the last block, no final norm."""

    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = EvaPatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.rope = EvaRope(cfg)
        self.blocks = nn.ModuleList([EvaBlock(cfg, self.rope) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)      # stored, unused
        self.head = nn.Linear(cfg.width, cfg.clip_embed_dim)     # stored, unused

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # -> [B, 1+N, C] incl. EVA CLS
        x: torch.Tensor = self.patch_embed(pixel_values)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x


class EvaClipVisualOnly(nn.Module):
    """FE CustomCLIP(is_only_visual=True): `model_visual.logit_scale` + `model_visual.visual.*`."""

    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.visual = EvaVisionTower(cfg)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))


# ----------------------------------------------------------------------------------------------------------
# Visualized-BGE
# ----------------------------------------------------------------------------------------------------------
def _build_text_model(text_config: Any, attn_implementation: str = "eager") -> Any:
    """The transformers text model of the config; eager attention (plain MatMul/Softmax, the same math as
    FE's eager BERT) for the export, SDPA for the PyTorch baseline of the benchmarks."""
    from transformers import AutoModel

    cfg = text_config.__class__.from_dict(text_config.to_dict())
    cfg._attn_implementation = attn_implementation
    # transformers leaves from_config unannotated
    return AutoModel.from_config(cfg, attn_implementation=attn_implementation)  # type: ignore[no-untyped-call]


class VisualizedBGE(nn.Module):
    """Holds the weights in the published layout (`bge_encoder`, `bge_embeddings`, `bge_pooler`,
    `model_visual`, `visual_proj`); forward paths are `image_tokens` and `text_embed`."""

    def __init__(self, vision_config: EvaVisionConfig, text_config: Any, attn_implementation: str = "eager"):
        super().__init__()
        text = _build_text_model(text_config, attn_implementation)
        self.text_config = text.config
        self.model_type = text.config.model_type                      # 'bert' | 'xlm-roberta'
        self.pad_token_id = int(text.config.pad_token_id)
        self.bge_encoder = text.encoder
        self.bge_embeddings = text.embeddings
        self.bge_pooler = text.pooler                                  # stored, unused (FE: pooler commented out)
        self.model_visual = EvaClipVisualOnly(vision_config)
        self.visual_proj = nn.Linear(vision_config.width, text.config.hidden_size)
        self.vision_config = vision_config
        self.eval()

    # -- vision ------------------------------------------------------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """FE encode_mm lines 1-3: EVA tokens, drop EVA CLS, visual_proj. [B, N, C_text]."""
        tokens: torch.Tensor = self.visual_proj(self.model_visual.visual(pixel_values)[:, 1:])
        return tokens

    # -- text / fusion -----------------------------------------------------------------------------------
    def text_embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The L2-normalized CLS embedding (FE encode_text / encode_mm)."""
        return F.normalize(self.cls_hidden(input_ids, attention_mask, image_tokens), dim=-1)

    def cls_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if image_tokens is None:
            image_tokens = self.visual_proj.weight.new_zeros(input_ids.shape[0], 0, self.visual_proj.out_features)
        emb = self.bge_embeddings
        # all index tensors are derived from data (cumsum of ones): no python control flow on values, and the
        # exported graph keeps T and N symbolic (N may be 0)
        ones_t = torch.ones_like(input_ids)
        t_idx = ones_t.cumsum(1) - 1                                            # [B,T] 0..T-1
        img_ones = torch.ones_like(image_tokens[:, :, 0], dtype=torch.long)     # [B,N]
        n = img_ones.sum(1, keepdim=True)                                       # [B,1] = N
        # FE encode_mm: text positions [0, N+1, ..., N+T-1]; with N=0 this is BERT's default arange(T)
        pos = torch.where(t_idx == 0, torch.zeros_like(t_idx), t_idx + n)
        if self.model_type in ("xlm-roberta", "roberta"):
            # FE encode_text passes position_ids=None: XLM-R then numbers tokens from padding_idx+1 and gives
            # pads padding_idx (create_position_ids_from_input_ids). Selected when N == 0.
            not_pad = input_ids.ne(self.pad_token_id).long()
            text_pos = not_pad.cumsum(1) * not_pad + self.pad_token_id
            pos = torch.where(n > 0, pos, text_pos)
        txt = emb(input_ids=input_ids, position_ids=pos, token_type_ids=torch.zeros_like(input_ids))
        # image tokens: + position_embeddings(1..N), embeddings LayerNorm; no token-type embedding
        img_pos = img_ones.cumsum(1)
        img = emb.LayerNorm(image_tokens + emb.position_embeddings(img_pos))
        hidden = torch.cat((txt[:, :1], img, txt[:, 1:]), dim=1)
        mask = torch.cat((img_ones.to(attention_mask.dtype), attention_mask), dim=1)  # FE: cat(ones(N), mask)
        # FE get_extended_attention_mask: (1 - m) * finfo(fp16).min, i.e. 0 or finfo(fp16).min; as a Where, no
        # int->float Cast (which the fp16 converter leaves typed float32)
        ext = torch.where(mask[:, None, None, :] > 0, 0.0, FP16_MIN).to(hidden.dtype)
        out: torch.Tensor = self.bge_encoder(hidden, attention_mask=ext)[0]
        return out[:, 0]


class VisionGraph(nn.Module):
    """Export graph 1: pixel_values [B,3,H,W] (H=W=image_size, fixed) -> image_tokens [B,N,C_text]."""

    def __init__(self, model: VisualizedBGE):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_tokens(pixel_values)


class TextGraph(nn.Module):
    """Export graph 2: (input_ids, attention_mask, image_tokens[B,N,C], N>=0) -> (L2-normalized CLS, CLS) [B,C]."""

    def __init__(self, model: VisualizedBGE):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = self.model.cls_hidden(input_ids, attention_mask, image_tokens)
        return F.normalize(cls, dim=-1), cls


def graph_modules(model: VisualizedBGE) -> dict[str, nn.Module]:
    """The exported graphs' modules by graph name (``graphs``): what the export traces and the benchmark's
    PyTorch baseline runs."""
    from bgevl.families.visualized.graphs import TEXT_GRAPH, VISION_GRAPH

    return {VISION_GRAPH: VisionGraph(model).eval(), TEXT_GRAPH: TextGraph(model).eval()}
