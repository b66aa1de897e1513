import pytest

from bgevl.core.errors import BgevlError
from bgevl.core.registry import all_models, get_model_spec
from bgevl.families.clip.graphs import clip_graph_specs
from bgevl.core.specs import COSINE_THRESHOLDS, Dim, GraphSpec

MODELS = all_models()


def test_clip_graph_specs_declare_names_shapes_and_dynamic_axes():
    specs = clip_graph_specs(image_size=224, max_text_length=77, embed_dim=512, opt_batch=8, max_batch=32)
    vision, text = specs["vision"], specs["text"]
    assert vision.input_names == ["pixel_values"]
    assert vision.output_names == ["image_embeds", "image_features"]
    assert vision.inputs[0].symbolic_shape() == ["batch", 3, 224, 224]
    assert text.input_names == ["input_ids", "attention_mask"]
    assert text.inputs[0].symbolic_shape() == ["batch", "sequence"]
    assert text.inputs[0].dtype == "int64"
    seq = text.inputs[0].dynamic_axes()[1]
    assert (seq.min, seq.max) == (1, 77)
    assert vision.inputs[0].dynamic_axes()[0] == Dim("batch", 1, 8, 32)
    assert text.inputs[0].concrete_shape("max") == (32, 77)
    assert text.inputs[0].concrete_shape("opt", batch=3) == (3, 16)


def test_graph_spec_json_round_trip():
    for spec in clip_graph_specs(image_size=336, max_text_length=77, embed_dim=768).values():
        assert GraphSpec.from_json(spec.to_json()) == spec


def test_dim_rejects_inconsistent_ranges():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Dim("batch", 4, 2, 8)


def test_model_registry_and_unknown_model_message():
    assert set(MODELS) >= {"tiny", "base", "large"}
    assert get_model_spec("large").hub_id == "BAAI/BGE-VL-large"
    assert get_model_spec("base").architecture["vision_config"]["patch_size"] == 16
    assert get_model_spec("large").architecture["vision_config"]["patch_size"] == 14
    with pytest.raises(BgevlError, match="choose one of: tiny, base, large"):
        get_model_spec("huge")
    assert COSINE_THRESHOLDS == {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99, "fp8": 0.99}
