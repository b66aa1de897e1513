"""``truncate`` (NONE / END / START) for every family: by the model's own tokens, the whole item within the model's
limit (prompt, instruction and image tokens never cut), the same tokens transformers' own truncation keeps where it
can say, and refusals in one line."""

import numpy as np
import pytest
from PIL import Image

from bgevl.core.errors import InputError
from bgevl.core.family import Request
from bgevl.runtime import Embedder

FAMILIES = ["tiny", "tiny-mllm", "tiny-screenshot", "tiny-visualized"]
LONG = " ".join(f"word{i}" for i in range(3000))
IMAGE = Image.new("RGB", (300, 200), (200, 30, 30))


@pytest.fixture(scope="module")
def embedders(export_dir):
    loaded = {model: Embedder.load(export_dir("fp32", model=model), provider="cpu") for model in FAMILIES}
    yield loaded
    for embedder in loaded.values():
        embedder.close()


def _kept_tokens(tokenizer, text):
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).tokens


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("composed", [False, True], ids=["text", "composed"])
def test_end_and_start_cut_the_text_to_the_limit_and_nothing_else(embedders, model, composed):
    embedder = embedders[model]
    pre, images = embedder.preprocessor, [IMAGE] if composed else None
    with pytest.raises(InputError, match=r"^text\[0\]: \d+ tokens with its prompt, over the model's limit of \d+; "
                                         r"shorten it or send truncate END or START$"):
        embedder.encode(images=images, text=[LONG], truncate="NONE")
    original = _kept_tokens(pre.tokenizer, LONG)
    for mode in ("END", "START"):
        admitted = pre.admit(Request(images, [LONG], truncate=mode))
        [(tokens, limit)] = pre.text_lengths(admitted)
        # as many tokens as fit: the limit itself, or one short where the next word piece re-tokenizes longer
        assert limit - 2 <= tokens <= limit
        cut = admitted.texts[0]
        kept = _kept_tokens(pre.tokenizer, cut)
        # the kept text's tokens are the original's first (END) or last (START) ones, give or take the one token at
        # the new edge ("word5" cut to "wor" tokenizes anew)
        inner = kept[:-1] if mode == "END" else kept[1:]
        window = original[:len(kept)] if mode == "END" else original[-len(kept):]
        assert (inner == window[:-1]) if mode == "END" else (inner == window[1:])
        # the vector is that of the cut text sent whole
        np.testing.assert_allclose(embedder.encode(images=images, text=[LONG], truncate=mode),
                                   embedder.encode(images=images, text=[cut], truncate="NONE"), atol=1e-6)


def test_dual_encoder_cuts_the_tokens_transformers_truncation_keeps(embedders):
    """transformers' own truncation on the side asked (the independent reference: ``truncation_side``) keeps the
    same token ids that reach the text graph."""
    embedder = embedders["tiny"]
    pre = embedder.preprocessor
    for mode, side in (("END", "right"), ("START", "left")):
        pre.tokenizer.truncation_side = side
        try:
            expected = pre.tokenizer([LONG], truncation=True, max_length=77)["input_ids"][0]
        finally:
            pre.tokenizer.truncation_side = "right"
        got = pre.prepare(pre.admit(Request(None, [LONG], truncate=mode)))["input_ids"][0].tolist()
        assert len(got) == len(expected) == 77
        if mode == "END":
            assert got == expected
        else:  # the text is cut at a token's start: its first piece may tokenize anew ("word2989" -> "d2989")
            # (one token becoming two shifts the edge by one)
            assert got[0] == expected[0] and got[-74:] == expected[-74:]


def test_texts_within_the_limit_are_untouched_and_modes_are_checked(embedders):
    embedder = embedders["tiny-mllm"]
    texts = ["a red square", "a photo of a cat"]
    plain = embedder.encode(text=texts, role="candidate")
    for mode in ("NONE", "END", "start"):
        np.testing.assert_array_equal(embedder.encode(text=texts, role="candidate", truncate=mode), plain)
    with pytest.raises(InputError, match=r"^truncate: 'MIDDLE' is not one of NONE, END, START$"):
        embedder.encode(text=texts, truncate="MIDDLE")


def test_an_item_whose_prompt_alone_is_over_the_limit_is_refused(embedders):
    """Truncation cuts only the text: where the instruction alone fills the limit, nothing can make it fit."""
    embedder = embedders["tiny-mllm"]
    instruction = " ".join(["retrieve"] * 5000)
    with pytest.raises(InputError, match=r"^text\[0\]: the item is over the model's limit of 4096 tokens without any "
                                         r"of its text"):
        embedder.encode(text=["a cat"], instruction=instruction, truncate="END")


def test_the_default_keeps_each_familys_own_handling(embedders):
    """No ``truncate``: CLIP cuts at the end with a warning (as before), the others refuse."""
    np.testing.assert_allclose(embedders["tiny"].encode(text=[LONG]), embedders["tiny"].encode(text=[LONG], truncate="END"),
                               atol=1e-6)
    with pytest.raises(InputError, match="over the exported sequence limit"):
        embedders["tiny-screenshot"].encode(text=[LONG])


def test_the_api_schemas_take_the_modes_truncation_knows():
    import typing

    from bgevl.api.schemas import TruncateMode
    from bgevl.core.truncation import TRUNCATE_MODES

    assert set(typing.get_args(TruncateMode)) == set(TRUNCATE_MODES)
