"""The project's own tokenizer: CLIP format, loadable by transformers and by `tokenizers` alone."""

from __future__ import annotations

import json

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from instaflow_edge.models import EMBEDDED_MODEL_DIR
from instaflow_edge.presets import TINY
from instaflow_edge.synthetic.captions import COLOURS, SHAPES
from instaflow_edge.tokenizer import build_tokenizer

TOKENIZER_DIR = EMBEDDED_MODEL_DIR / "tokenizer"


def test_loads_in_transformers_with_clip_special_tokens():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    ids = tokenizer("a red circle").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.model_max_length == TINY["text_encoder"]["max_position_embeddings"]


def test_caption_words_are_single_tokens():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    for word in (*COLOURS, *SHAPES, "above", "below", "triangles"):
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word


def test_any_ascii_prompt_has_no_unknown_tokens():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = tokenizer("Zebra-crossing, quickly; 42 jumps!").input_ids[1:-1]
    assert tokenizer.unk_token_id not in ids


def test_tokenizers_library_alone_gives_the_same_ids():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    bare = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    for prompt in ("a red circle above a blue square", "Two SMALL green triangles!"):
        assert bare.encode(prompt).ids == tokenizer(prompt).input_ids


def test_shipped_tokenizer_is_what_the_builder_makes(tmp_path):
    config = TINY["text_encoder"]
    build_tokenizer(tmp_path, config["vocab_size"], config["max_position_embeddings"])
    built, shipped = (json.loads((d / "vocab.json").read_text()) for d in (tmp_path, TOKENIZER_DIR))
    assert built == shipped
    assert (tmp_path / "merges.txt").read_text() == (TOKENIZER_DIR / "merges.txt").read_text()
