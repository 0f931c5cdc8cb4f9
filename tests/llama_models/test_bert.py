"""The BERT sentence encoder against sentence-transformers itself.

all-minilm-l6-v2 is the real model shipped in its package (a sentence-transformers directory in
the legacy config spelling); the pooling-mode tests build tiny random BERTs with transformers and
save them with sentence-transformers 6 (the new spelling), so both readers are checked.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_engine import (
    ConfigError,
    ContextOverflowError,
    UnsupportedArchitectureError,
    WeightLoadError,
)
from llama_models import open_encoder, open_model, resolve_model_path
from llama_models.bert import BertConfig, read_sentence_config
from llama_runtime.embedder import SentenceEmbedder

_BASE = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "How do I reset my password?",
    "Quarterly revenue grew by 5 percent year over year.",
    "",
    " ",
    "a",
    "OK",
    "Hello, world!",
    "What's the weather like in Paris tomorrow?",
    "Le chat est assis sur le tapis.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "¿Dónde está la biblioteca?",
    "Ça va très bien, merci beaucoup !",
    "東京は日本の首都です。",
    "北京是中国的首都。",
    "서울은 한국의 수도입니다.",
    "Москва — столица России.",
    "القاهرة هي عاصمة مصر.",
    "नई दिल्ली भारत की राजधानी है।",
    "Ο Σωκράτης ήταν φιλόσοφος.",
    "I love pizza 🍕🍕 and tacos 🌮!",
    "🙂🙂🙂",
    "👩‍👩‍👧‍👦 family emoji with joiners",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT name, count(*) FROM users GROUP BY name HAVING count(*) > 1;",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "https://example.com/path?query=1&other=two#frag",
    "user@example.org wrote: >>> see the attached file.",
    "3.14159 2.71828 1.41421 0.57721",
    "Tab\tseparated\tvalues\nand new lines\r\nhere",
    "ALL CAPS SENTENCE SHOUTING AT THE READER",
    "naïve café résumé façade coöperate",
    "Ünïcödé ẗëẍẗ ŵïẗḧ ḋïäċṙïẗïċṡ",
    "[CLS] [SEP] [MASK] [PAD] tokens as plain text",
    "The the the the the the the the the the.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "e = mc^2; ∑_{i=1}^{n} i = n(n+1)/2; ∀x ∃y",
    "$100, €200, ¥300, £400 — prices vary.",
    "ירושלים היא עיר עתיקה.",
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "Hà Nội là thủ đô của Việt Nam.",
    "İstanbul çok güzel bir şehir.",
    "Zażółć gęślą jaźń.",
    "O rato roeu a roupa do rei de Roma.",
    "Nel mezzo del cammin di nostra vita.",
    "Het regent pijpenstelen vandaag.",
]
_WORDS = ["river", "model", "coffee", "garden", "engine", "vector", "memory", "ancient",
          "quickly", "bright", "search", "token", "library", "travel", "explain", "curious"]
_LONG = " ".join(f"word{i} and more text about topic {i % 7}." for i in range(200))


def _corpus() -> list[str]:
    rng = random.Random(6)
    out = list(_BASE)
    for n in (3, 5, 8, 13, 21, 34, 55, 89, 120, 150, 200):
        out += [" ".join(rng.choice(_WORDS) for _ in range(n)) for _ in range(5)]
    out += [_LONG, _LONG[:700], "A" * 1000, "word " * 600]
    return out


CORPUS = _corpus()


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return resolve_model_path("all-minilm-l6-v2")


@pytest.fixture(scope="module", params=["native", "torch"])
def embedder(request: pytest.FixtureRequest) -> SentenceEmbedder:
    """The encoder on the kernels over numpy (what a CPU runs by default, without torch) and on
    torch: both must be sentence-transformers' model."""
    emb = SentenceEmbedder("all-minilm-l6-v2", backend=request.param, device="cpu", threads=2)
    assert emb.backend == request.param
    return emb


@pytest.fixture(scope="module")
def st_model(minilm_dir: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers(embedder: SentenceEmbedder, st_model) -> None:
    assert len(CORPUS) >= 100
    ours = embedder.embed_array(CORPUS)
    ref = st_model.encode(CORPUS, batch_size=32)
    assert ours.shape == ref.shape == (len(CORPUS), 384)
    cos = _cosines(ours, ref)
    assert cos.min() >= 0.9999, (cos.min(), CORPUS[int(cos.argmin())])
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # Normalize module


def test_token_ids_equal_the_hf_tokenizer(embedder: SentenceEmbedder, st_model) -> None:
    feats = st_model.preprocess(CORPUS)
    ref = [ids[m.bool()].tolist() for ids, m in zip(feats["input_ids"], feats["attention_mask"],
                                                     strict=True)]
    assert embedder.tokenize(CORPUS) == ref
    assert len(embedder.tokenize([_LONG])[0]) == embedder.max_seq_length == 256


def test_a_text_embeds_the_same_alone_and_in_a_padded_batch(embedder: SentenceEmbedder) -> None:
    short = "Short text."
    alone = embedder.embed_array([short])[0]
    batch = embedder.embed_array([_LONG, "medium length sentence with a few words", short])
    np.testing.assert_allclose(batch[2], alone, atol=1e-5)
    reordered = embedder.embed_array([short, _LONG], batch_size=1)
    np.testing.assert_allclose(reordered[0], alone, atol=1e-5)
    np.testing.assert_allclose(reordered[1], batch[0], atol=1e-5)


def test_truncate_false_raises_a_typed_error(embedder: SentenceEmbedder) -> None:
    with pytest.raises(ContextOverflowError, match="truncate=True"):
        embedder.embed([_LONG], truncate=False)
    assert len(embedder.embed(["fits"], truncate=False)[0]) == 384


def test_pipeline_config_read_from_the_models_files(minilm_dir: Path) -> None:
    st = read_sentence_config(minilm_dir)
    assert st.pooling == ("mean",) and st.normalize and st.max_seq_length == 256
    files = open_encoder("all-minilm-l6-v2")
    assert files.config.dim == 384 and files.config.n_layers == 6 and files.dim == 384
    assert len(files.weights) == 5 + 16 * 6


def test_bad_configs_raise_typed_errors(tmp_path: Path, minilm_dir: Path) -> None:
    cfg = json.loads((minilm_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        BertConfig.from_hf({k: v for k, v in cfg.items() if k != "num_hidden_layers"})
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act"):
        BertConfig.from_hf({**cfg, "hidden_act": "swish"})
    d = tmp_path / "dense"
    d.mkdir()
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"},
    ]))
    with pytest.raises(UnsupportedArchitectureError, match="Dense"):
        read_sentence_config(d)
    bad = tmp_path / "bad"
    shutil.copytree(minilm_dir, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 1000}))
    with pytest.raises(WeightLoadError, match="shape"):
        open_encoder(str(bad))


def test_wrong_kind_of_model_is_refused_with_a_hint() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="embed_model"):
        open_model("all-minilm-l6-v2")
    with pytest.raises(UnsupportedArchitectureError, match="directory"):
        open_encoder("smollm2-135m-instruct")


# -- pooling modes on tiny random BERTs, saved by sentence-transformers 6 -------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    from transformers import BertConfig as HFBertConfig
    from transformers import BertModel as HFBertModel

    torch.manual_seed(0)
    cfg = HFBertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                       hidden_act="gelu_new")
    out = tmp_path_factory.mktemp("tiny") / "hf"
    HFBertModel(cfg).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        shutil.copy(minilm_dir / name, out / name)
    return out


@pytest.mark.parametrize("modes,normalize", [
    ("cls", False), ("max", False), ("mean_sqrt_len_tokens", True), ("weightedmean", False),
    ("lasttoken", False), (("cls", "mean"), True),
])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_pooling_modes_match_sentence_transformers(tiny_bert: Path, tmp_path: Path,
                                                   modes: str | tuple[str, ...],
                                                   normalize: bool, backend: str) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    modules = [Transformer(str(tiny_bert), max_seq_length=48), Pooling(32, pooling_mode=modes)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    ref_model = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    ours = SentenceEmbedder(str(tmp_path / "st"), backend=backend, device="cpu")
    assert ours.max_seq_length == ref_model.max_seq_length == 48
    texts = [*CORPUS[:30], _LONG]
    np.testing.assert_allclose(ours.embed_array(texts, batch_size=8),
                               ref_model.encode(texts, batch_size=8), atol=2e-5)
