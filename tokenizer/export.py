"""Export a hanyeong tokenizer as tiktoken ranks that encode exactly as the tokenizer does.

tiktoken merges any adjacent pair whose concatenation has a rank; `pipeline.assemble` lists every
such merge ordered by rank, so the same ids come out of both (a test holds it).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from hanyeong.errors import DataError
from hanyeong.files import write_atomic
from tokenizer.bbpe import BBPETokenizer
from tokenizer.pipeline import byte_level_bytes

RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tiktoken_config.json"


def split_pattern_of(tokenizer: BBPETokenizer) -> str:
    """The regex of the tokenizer's Split pre-tokenizer (hanyeong layout: Split -> ByteLevel)."""
    pre = json.loads(tokenizer.hf.to_str())["pre_tokenizer"] or {}
    steps = pre.get("pretokenizers", [pre])
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    raise DataError("export needs a hanyeong byte-level tokenizer (Split regex + ByteLevel pre-tokenizer)")


def export_tiktoken(tokenizer: BBPETokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.tiktoken (`base64(bytes) rank` lines) and tiktoken_config.json."""
    out_dir = Path(out_dir)
    specials = set(tokenizer.special_ids)
    lines = []
    for token, rank in sorted(tokenizer.hf.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]):
        if rank not in specials:
            lines.append(f"{base64.b64encode(byte_level_bytes(token)).decode('ascii')} {rank}")
    config = {
        "pat_str": split_pattern_of(tokenizer),
        "special_tokens": {tokenizer.hf.id_to_token(i): i for i in sorted(specials)},
        "n_vocab": tokenizer.vocab_size,
    }
    write_atomic(out_dir / RANKS_FILE, "\n".join(lines) + "\n")
    write_atomic(out_dir / CONFIG_FILE, json.dumps(config, ensure_ascii=False, indent=2))
    return out_dir


def load_tiktoken_encoding(directory: str | Path, name: str = "hanyeong"):
    """A tiktoken.Encoding from an exported directory."""
    import tiktoken

    from tokenizer.peers import read_rank_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    return tiktoken.Encoding(
        name=name,
        pat_str=config["pat_str"],
        mergeable_ranks=read_rank_file(directory / RANKS_FILE),
        special_tokens=config["special_tokens"],
        explicit_n_vocab=config["n_vocab"],
    )
