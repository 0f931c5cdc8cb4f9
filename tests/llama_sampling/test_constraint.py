"""llama_sampling.constraint on the vocabularies we ship (SmolLM2's byte-level BPE, Gemma 3's
262k SentencePiece pieces): whatever the logits, the masked choices spell a valid answer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama_models import resolve_model_path
from llama_models.checkpoint import read_checkpoint
from llama_sampling.constraint import Grammar
from llama_tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "tags", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 8}},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma3-270m"])
def test_random_logits_through_the_mask_spell_valid_json(model: str) -> None:
    tok = Tokenizer.from_gguf_metadata(read_checkpoint(resolve_model_path(model)).metadata)
    grammar = Grammar.compile({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, tok)
    rng = np.random.default_rng(0)
    for _ in range(3):
        c, out = grammar.constraint(), []
        while not c.finished:
            logits = rng.standard_normal(tok.vocab_size).astype(np.float32) * 4
            c.mask(logits)
            token = int(np.argmax(logits))
            c.advance(token)
            if token in tok.eog_ids:
                break
            out.append(token)
            assert len(out) < 400
        value = json.loads(tok.decode(out))
        assert set(value) == {"name", "tags", "age"} and 0 <= value["age"] <= 150
        assert len(value["name"]) <= 12 and len(value["tags"]) <= 3
