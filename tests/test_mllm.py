"""BGE-VL-MLLM (LLaVA-NeXT) export: parity with transformers, pooling, anyres layout, structure.

The reference is computed here, independently of the exporter: the prompt strings written out
as BGE-VL-MLLM's remote code builds them, the checkpoint's ``LlavaNextProcessor``, transformers'
``LlavaNextModel`` forward and the last token's hidden state (``[:, -1]`` for left padding, the
row's last real token for right padding), L2-normalized.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from bgevl.core.errors import InputError
from bgevl.export import ExportOptions, run_export
from bgevl.runtime import Embedder
from bgevl.families.mllm.preprocessing import ImageLayout, build_prompt

INSTRUCTION = "Retrieve the target image that best meets the combined criteria: "
# (height, width): square, wide, tall, very wide: four anyres grids and unpadding directions
SIZES = [(60, 60), (40, 100), (120, 50), (33, 170), (90, 64)]
BOUNDS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}


def images(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 255], -1)
        out.append(Image.fromarray((base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)))
    return out


# A mixed batch: image-only, text-only and composed items, texts of different lengths.
ITEMS = [(0, "a cat"), (None, "only some text here, rather longer than the others"), (1, None),
         (2, "the long one " * 6), (None, "x"), (3, None), (4, "make it red")]


def original_prompt(text, has_image, query):
    """BGE-VL-MLLM's ``prepare_text_input``, spelled out (MegaPairs remote code)."""
    if query:
        p = f"[INST] \n <instruct> {INSTRUCTION} <query> "
        p = f"{p} {text} \n" if text is not None else p
    else:
        p = "[INST] "
        p = f"{p} {text} \n" if text is not None else p
    p = f"{p} <image>" if has_image else p
    return f"{p} [/INST]"


@torch.inference_mode()
def reference(model, processor, items, imgs, query, padding_side):
    processor.tokenizer.padding_side = padding_side
    try:
        prompts = [original_prompt(t, i is not None, query) for i, t in items]
        pics = [imgs[i] for i, _ in items if i is not None]
        enc = processor(text=prompts, images=pics or None, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "left"
    hidden = model.model(**enc, use_cache=False).last_hidden_state
    if padding_side == "left":
        pooled = hidden[:, -1]
    else:
        pooled = hidden[torch.arange(len(items)), enc["attention_mask"].sum(1) - 1]
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def encode(emb, items, imgs, query):
    return emb.encode(images=[imgs[i] if i is not None else None for i, _ in items], text=[t for _, t in items],
                      role="query" if query else "candidate", instruction=INSTRUCTION if query else None)


def test_prompts_match_the_original_strings():
    # the exact reprs from the remote code's prepare_text_input
    assert build_prompt("T", True, "q", "I") == "[INST] \n <instruct> I <query>  T \n <image> [/INST]"
    assert build_prompt(None, True, "c", None) == "[INST]  <image> [/INST]"
    assert build_prompt("T", False, "c", None) == "[INST]  T \n [/INST]"
    assert build_prompt("T", False, "query", None) == "[INST] \n <instruct>  <query> T \n [/INST]"
    for text, img, q in [("a b", True, True), (None, True, False), ("z", False, True), ("y", True, False)]:
        assert build_prompt(text, img, "query" if q else "candidate", INSTRUCTION if q else None) == original_prompt(text, img, q)


def test_anyres_index_matches_transformers_packing(tiny_mllm_reference):
    """The precomputed index reproduces LlavaNextModel.pack_image_features (grid, unpad, newline)."""
    model, processor = tiny_mllm_reference
    layout = ImageLayout.from_config(model.config)
    hidden = model.config.text_config.hidden_size
    for h, w in SIZES + [(336, 100), (20, 20), (512, 512)]:
        tiles = layout.num_tiles(h, w)
        # features that encode their own (tile, patch) row number
        feats = torch.arange(tiles * layout.tile_tokens, dtype=torch.float32).reshape(tiles, layout.tile_tokens, 1)
        feats = feats.expand(-1, -1, hidden).contiguous()
        newline = torch.full((hidden,), -1.0)
        packed, lens = model.model.pack_image_features([feats], torch.tensor([[h, w]]), "default", newline)
        want = packed[0][:, 0].long().numpy()
        np.testing.assert_array_equal(layout.packed_rows(h, w), want, err_msg=f"size {(h, w)}")
        assert len(want) == processor._get_number_of_features(h, w, layout.tile_size, layout.tile_size) - 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("query", [True, False], ids=["query", "candidate"])
def test_fp32_parity_mixed_batches(padding_side, query, export_dir, tiny_mllm_reference):
    model, processor = tiny_mllm_reference
    emb = Embedder.load(export_dir("fp32", model="tiny-mllm"), provider="cpu", image_resize=None)
    emb.preprocessor.tokenizer.padding_side = padding_side
    imgs = images()
    got = encode(emb, ITEMS, imgs, query)
    want = reference(model, processor, ITEMS, imgs, query, padding_side)
    assert got.shape == (len(ITEMS), model.config.text_config.hidden_size) and got.dtype == np.float32
    cos = np.sum(got * want, axis=1)
    assert cos.min() >= 0.9999, cos
    assert np.abs(got - want).max() < 1e-4
    # retrieval: each embedding's nearest reference is its own item
    assert (np.argmax(got @ want.T, axis=1) == np.arange(len(ITEMS))).all()


def test_left_and_right_padding_give_the_same_embeddings(export_dir):
    emb = Embedder.load(export_dir("fp32", model="tiny-mllm"), provider="cpu", image_resize=None)
    imgs = images()
    left = encode(emb, ITEMS, imgs, True)
    emb.preprocessor.tokenizer.padding_side = "right"
    right = encode(emb, ITEMS, imgs, True)
    assert np.sum(left * right, axis=1).min() >= 0.9999
    # pooling position -1 would be wrong for right padding: the rows differ in length
    one_by_one = np.concatenate([encode(emb, [item], imgs, True) for item in ITEMS])
    assert np.sum(left * one_by_one, axis=1).min() >= 0.9999


@pytest.mark.parametrize("precision,mode", [("fp16", "qdq"), ("int8", "qdq"), ("int8", "dynamic")])
def test_reduced_precision_parity(precision, mode, export_dir, tiny_mllm_reference):
    model, processor = tiny_mllm_reference
    kw = {"int8_mode": mode} if precision == "int8" else {}
    directory = export_dir(precision, model="tiny-mllm", **kw)
    emb = Embedder.load(directory, provider="cpu", image_resize=None)
    imgs = images()
    got = encode(emb, ITEMS, imgs, True)
    want = reference(model, processor, ITEMS, imgs, True, "left")
    assert np.sum(got * want, axis=1).min() >= BOUNDS[precision]
    assert (np.argmax(got @ want.T, axis=1) == np.arange(len(ITEMS))).all()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["precision"] == precision
    ops = {n.op_type for n in onnx.load(str(directory / "mllm_language.onnx")).graph.node}
    if precision == "int8":  # weight-only: no activation quantization anywhere
        assert "QuantizeLinear" not in ops and "DynamicQuantizeLinear" not in ops
        assert ("DequantizeLinear" if mode == "qdq" else "MatMulNBits") in ops


def test_fp16_keeps_rmsnorm_rotary_and_norm_in_float32(export_dir):
    model = onnx.load(str(export_dir("fp16", model="tiny-mllm") / "mllm_language.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    fragile = [n for n in inferred.graph.node if n.op_type in ("Pow", "ReduceMean", "Sqrt", "Cos", "Sin", "Softmax", "ReduceL2")]
    assert {n.op_type for n in fragile} == {"Pow", "ReduceMean", "Sqrt", "Cos", "Sin", "Softmax", "ReduceL2"}
    for node in fragile:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, f"{node.op_type} {node.name} runs in float16"
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_no_lm_head_and_no_vocabulary_sized_output(export_dir, tiny_mllm_reference):
    model, _ = tiny_mllm_reference
    vocab, hidden = model.config.text_config.vocab_size, model.config.text_config.hidden_size
    directory = export_dir("fp32", model="tiny-mllm")
    matrices = 0
    for name in ("mllm_vision", "mllm_language"):
        graph = onnx.load(str(directory / f"{name}.onnx")).graph
        for out in graph.output:
            dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
            assert vocab not in dims, f"{name} output {out.name} has a vocabulary-sized axis {dims}"
        matrices += sum(1 for i in graph.initializer if sorted(i.dims) == sorted([vocab, hidden]))
    assert matrices == 1, "the vocabulary x hidden matrix must appear once (token embeddings), not twice (LM head)"
    language = onnx.load(str(directory / "mllm_language.onnx")).graph
    assert [o.name for o in language.output] == ["embeds", "pooled_hidden"]
    assert [i.name for i in language.input] == ["input_ids", "attention_mask", "tile_features", "image_feature_index"]


def test_runtime_default_resizes_to_512_and_batches(export_dir):
    directory = export_dir("fp32", model="tiny-mllm")
    emb = Embedder.load(directory, provider="cpu")
    imgs = images()
    # BGE-VL resizes every image to 512x512 first: the same picture at two sizes embeds the same
    small, big = imgs[0], imgs[0].resize((300, 170))
    a, b = emb.encode(images=[small, big])
    assert float(a @ b) > 0.9999
    native = Embedder.load(directory, provider="cpu", image_resize=None)
    a, b = native.encode(images=[small, big])  # at their own sizes: different anyres grids
    assert float(a @ b) < 0.999
    many = emb.encode(text=[f"text number {i}" for i in range(19)])  # over the max batch of 8
    assert many.shape == (19, emb.dim)
    np.testing.assert_allclose(many[3], emb.encode(text="text number 3")[0], atol=1e-5)


def test_input_errors(export_dir):
    emb = Embedder.load(export_dir("fp32", model="tiny-mllm"), provider="cpu")
    with pytest.raises(InputError, match="instruction applies to queries only"):
        emb.encode(text="a", role="candidate", instruction="x")
    with pytest.raises(InputError, match="item 1: needs an image, a text or both"):
        emb.encode(images=[images()[0], None], text=["a", None])
    with pytest.raises(InputError, match=r"text\[0\]: empty text"):
        emb.encode(text=["  "])
    with pytest.raises(InputError, match="role 'x'"):
        emb.encode(text="a", role="x")
    with pytest.raises(InputError, match=r"images\[0\] <5 bytes>: not a readable image"):
        emb.encode(images=[b"junk!"])
    with pytest.raises(InputError, match="over the exported sequence limit of 4096 tokens"):
        emb.encode(text="word " * 5000)
    # LLaVA's image placeholder in a user's text: the processor failed on the count (a 500 in the API)
    with pytest.raises(InputError, match=r"^text\[0\]: holds the model's control token '<image>'"):
        emb.encode(text=["look at <image> here"])


def test_fp32_of_the_7b_model_is_refused_without_force(tmp_path):
    with pytest.raises(Exception, match="--precision fp32 for mllm-s1 .* --force-fp32"):
        run_export(ExportOptions(output=tmp_path / "x", model="mllm-s1", precision="fp32"), sink=lambda m: None)
    assert not (tmp_path / "x").exists()


def test_full_depth_7b_graphs_trace_on_meta_weights(tmp_path):
    """BGE-VL-MLLM's two graphs at full size (all 32 Mistral-7B decoder layers, ViT-L/14-336), traced
    with the weights on the meta device (about 0.6 GB of memory instead of 30 GB) and saved with the
    weights as graph inputs. The exporter's optimizer is off here: it constant-folds weights, which
    meta tensors do not have. The full-width numerics (2 of the 32 layers, random weights, fp16
    validation) are in tests/test_full_size.py."""
    from transformers import LlavaNextForConditionalGeneration

    from bgevl.families.mllm.checkpoint import generated_llama_tokenizer, generated_mllm_config
    from bgevl.graphs import onnx_passes
    from bgevl.families.mllm.modules import graph_modules
    from bgevl.core.registry import get_model_spec
    from bgevl.families.mllm.graphs import MLLM_LANGUAGE_GRAPH, mllm_graph_specs_from_config
    from bgevl.core.specs import ONNX_OPSET

    config = generated_mllm_config(get_model_spec("mllm-s1"), generated_llama_tokenizer())
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (32, 4096, 32005)
    with torch.device("meta"):
        llava = LlavaNextForConditionalGeneration(config).eval()
    graphs, modules = mllm_graph_specs_from_config(config), graph_modules(llava)
    exported = {}
    for name, spec in graphs.items():
        args = tuple(torch.zeros(t.concrete_shape("opt"), dtype=getattr(torch, t.dtype), device="meta") for t in spec.inputs)
        program = torch.onnx.export(modules[name], args, input_names=spec.input_names, output_names=spec.output_names,
                                    dynamic_shapes=onnx_passes.torch_dynamic_shapes(spec), opset_version=ONNX_OPSET,
                                    dynamo=True, optimize=False)
        path = tmp_path / spec.filename
        program.save(str(path), include_initializers=False, keep_initializers_as_inputs=True)
        onnx_passes.check_onnx(path)  # onnx.checker, full check (strict shape inference)
        exported[name] = onnx.load(str(path))
        graph = exported[name].graph
        assert [i.name for i in graph.input[:len(spec.inputs)]] == spec.input_names
        assert [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in graph.output] == \
            [(t.name, t.symbolic_shape()) for t in spec.outputs]
    language = exported[MLLM_LANGUAGE_GRAPH]
    # what the fp16 pass keeps in float32 is found at full depth: every RMSNorm (2 per layer + the
    # final norm) and the rotary angles
    assert len(onnx_passes.rms_norm_nodes(language)) == 6 * (2 * text.num_hidden_layers + 1)
    assert onnx_passes.rotary_nodes(language)
    # the decoder's parameters, its rotary frequencies and the image_newline, nothing else: no LM
    # head (a second 32005 x 4096)
    shapes = [[d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in language.graph.input[len(graphs[MLLM_LANGUAGE_GRAPH].inputs):]]
    assert sum(1 for s in shapes if sorted(s) == sorted([text.vocab_size, text.hidden_size])) == 1
    decoder = llava.model.language_model
    expected = sum(p.numel() for p in decoder.parameters()) + decoder.rotary_emb.inv_freq.numel() + llava.model.image_newline.numel()
    assert sum(int(np.prod(s)) for s in shapes) == expected
    assert 7.0e9 < expected < 7.2e9  # Mistral-7B without its 131M-parameter LM head


def test_loads_the_transformers_4_45_weight_layout(tmp_path, tiny_mllm_reference):
    """BGE-VL-MLLM's hub checkpoints were saved by the remote class ``LLaVANextForEmbedding``, a
    transformers 4.45 ``LlavaNextForConditionalGeneration``: ``language_model.model.*``,
    ``language_model.lm_head``, top-level ``vision_tower.vision_model.*``, ``multi_modal_projector.*``
    and ``image_newline``. Today's class nests them under ``model.``; load_mllm must map every tensor."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    from bgevl.families.mllm.checkpoint import generate_mllm_checkpoint, load_mllm
    from bgevl.core.registry import get_model_spec

    source = generate_mllm_checkpoint(get_model_spec("tiny-mllm"), tmp_path / "current")
    tensors = load_file(str(source / "model.safetensors"))
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(source, legacy_dir)
    # transformers 5 already saves language_model.model.*, language_model.lm_head.* and image_newline;
    # 4.45 also kept the CLIPVisionModel wrapper's vision_model prefix
    legacy = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in tensors.items()}
    assert any(k.startswith("language_model.model.layers.") for k in legacy) and "image_newline" in legacy
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in legacy)
    save_file(legacy, str(legacy_dir / "model.safetensors"), metadata={"format": "pt"})

    model, _ = load_mllm(legacy_dir)
    want = tiny_mllm_reference[0].state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []  # a missing tensor would be random
