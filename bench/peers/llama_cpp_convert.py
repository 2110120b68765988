"""llama.cpp's own convert_hf_to_gguf.py, run on a bench checkpoint, to an f32 GGUF.

    python -m bench.peers.llama_cpp_convert LLAMA_CPP_SRC MODEL_DIR OUT.gguf

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a test string, and
knows only published tokenizers' hashes. The random bench checkpoints carry
`bench.checkpoints.build_gpt2_tokenizer`'s byte-level BPE, which splits with GPT-2's rule, so a
hash the converter does not know is named "gpt-2" (the rule llama-server then applies). And
the converter reads a GPT-2 config's context length as `n_ctx`, a name transformers 5 no longer
writes (it is `n_positions`). Every other step is the converter's own.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> None:
    src, model, out = argv if argv is not None else sys.argv[1:]
    sys.path[:0] = [src, f"{src}/gguf-py"]
    from conversion.base import ModelBase, TextModel

    known_pre, read_config = TextModel.get_vocab_base_pre, ModelBase.load_hparams

    def known_pre_or_gpt2(self: Any, tokenizer: Any) -> str:
        try:
            return str(known_pre(self, tokenizer))
        except NotImplementedError:
            return "gpt-2"

    def config_with_n_ctx(*args: Any, **kwargs: Any) -> dict[str, Any]:
        config = dict(read_config(*args, **kwargs))
        if "n_positions" in config:
            config.setdefault("n_ctx", config["n_positions"])
        return config

    TextModel.get_vocab_base_pre = known_pre_or_gpt2
    ModelBase.load_hparams = staticmethod(config_with_n_ctx)
    sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", out]
    runpy.run_path(f"{src}/convert_hf_to_gguf.py", run_name="__main__")


if __name__ == "__main__":
    main()
