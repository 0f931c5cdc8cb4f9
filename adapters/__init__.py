"""Framework adapters over `llama_engine.LlamaEngine`; each lives in its own module and needs its
extra installed:

* `adapters.langchain` (extra `langchain`): `ChatLlamaEngine`, `LlamaEngineEmbeddings`;
* `adapters.langgraph` (extra `langgraph`): ready-made graph nodes, `chat_node(engine, ...)`;
* `adapters.llama_index` (extra `llama-index`): `LlamaEngineLLM`, `LlamaEngineEmbedding`;
* `adapters.openai_server` (extra `server`): `create_app(engine)`, the OpenAI-compatible HTTP
  server behind `llama-engine serve`.

This package imports none of them: `import adapters` stays cheap, and the core packages never
import an adapter. Adapters use only the `LlamaEngine` interface (plus
`llama_runtime.create_engine` to build one), never a backend's internals.
"""
