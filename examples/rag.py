"""RAG over this project's own docs with LlamaIndex: our embeddings, our LLM, one local engine.

    pip install -e ".[llama-index]"
    python examples/rag.py "How are cached KV blocks evicted?"

The engine generates with SmolLM2-135M-Instruct and embeds with all-MiniLM-L6-v2. docs/*.md and
README.md are split into ~180-token chunks, embedded into a `VectorStoreIndex`, and a query
engine streams an answer from the best chunks, then lists the sources it used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import BaseQueryEngine

from adapters.llama_index import LlamaEngineEmbedding, LlamaEngineLLM
from llama_engine import LlamaEngine

ROOT = Path(__file__).resolve().parents[1]
CHUNK_TOKENS = 180  # all-MiniLM-L6-v2 reads 256 word pieces; stay under with the metadata line


def load_documents(root: Path = ROOT) -> list[Document]:
    """docs/*.md and README.md, each one Document named by its path under `root`."""
    paths = [*sorted((root / "docs").glob("*.md")), root / "README.md"]
    return [Document(text=p.read_text(encoding="utf-8"), id_=str(p.relative_to(root)),
                     metadata={"file_name": str(p.relative_to(root))})
            for p in paths if p.is_file()]


def build_index(engine: LlamaEngine, documents: list[Document]) -> VectorStoreIndex:
    """Chunk, embed (with the engine) and index `documents`."""
    return VectorStoreIndex.from_documents(
        documents,
        embed_model=LlamaEngineEmbedding(engine=engine),
        transformations=[SentenceSplitter(chunk_size=CHUNK_TOKENS, chunk_overlap=20)],
    )


def query_engine(
    engine: LlamaEngine, index: VectorStoreIndex, *, max_tokens: int = 160, top_k: int = 2
) -> BaseQueryEngine:
    """A streaming query engine answering with the engine's chat model from `top_k` chunks."""
    llm = LlamaEngineLLM(engine=engine, max_tokens=max_tokens, temperature=0)
    return index.as_query_engine(llm=llm, streaming=True, similarity_top_k=top_k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="How are cached KV blocks evicted?")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args(argv)

    from llama_runtime import create_engine

    engine = create_engine(embed_model="all-minilm-l6-v2", progress=False)
    index = build_index(engine, load_documents())
    response = query_engine(engine, index, max_tokens=args.max_tokens,
                            top_k=args.top_k).query(args.question)
    for token in response.response_gen:
        print(token, end="", flush=True)
    print("\n\nsources:")
    for hit in response.source_nodes:
        print(f"  {hit.node.metadata['file_name']}  (score {hit.score:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
