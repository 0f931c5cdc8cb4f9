"""llama_tokenizer: tokenizers from GGUF vocabularies, HF `tokenizer.json` and SentencePiece
models; chat templates rendered like HF; streaming detokenization that never splits a character.

    tok = Tokenizer.from_gguf_metadata(meta)        # or from_hf_dir / from_tokenizer_json / ...
    ids = tok.encode("Hello")                       # BOS added when the model asks for it
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    dec = tok.stream_decoder()
    text = "".join(dec.push(i) for i in ids) + dec.flush()
"""

from llama_tokenizer.base import Tokenizer
from llama_tokenizer.chat_template import ChatTemplate
from llama_tokenizer.detokenizer import StreamDecoder

__all__ = ["ChatTemplate", "StreamDecoder", "Tokenizer"]
