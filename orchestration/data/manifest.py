"""`DATASET/manifest.json`: what a dataset holds, how it was made, and how to tell it is unchanged.

`inputs_hash` fingerprints everything a run reads (the config, every input and benchmark file's
name and bytes, the tokenizer), never where the files lie: a re-run with the same fingerprint over
intact shards is a no-op, also after the inputs or the repository moved. `path_digest` is the
content of an input file or folder, for the same purpose in stage identities.
`content_hash` fingerprints what it wrote (the tokenizer and every shard's SHA-256): two runs that
produced identical shards have the same content hash. A dataset is built in a temporary folder beside
its destination and renamed into place, so a crash never leaves a half dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from hanyeong.errors import DataError

FORMAT = "hanyeong-dataset"
VERSION = 1
MANIFEST = "manifest.json"
# What a prepared dataset's rows hold: 'text' documents (prepare.py) or 'chat' conversations with a
# loss_mask column (chat_dataset.py). A recipe's [[run.datasets]] `format` is one of these, and a
# stage kind (orchestration/pipeline/kinds.py) names the ones its sources may have.
# 'preference' pairs (a prompt, a chosen and a rejected answer: preference.py).
DATASET_FORMATS = ("text", "chat", "preference")


def _digest(obj: object) -> str:
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()


def inputs_hash(config: dict, files: list[str], tokenizer: dict) -> str:
    """SHA-256 over the config (free of paths), the name and bytes of every file read (inputs and
    benchmarks) and the tokenizer."""
    return _digest(
        {
            "version": VERSION,
            "config": config,
            "tokenizer": tokenizer["sha256"],
            "files": sorted({(Path(f).name, input_sha256(f)) for f in files}),
        }
    )


# An input's sha256 by (device, inode, size, mtime_ns): a file renamed or moved within its filesystem
# keeps them, a copy or an edit does not. Kept per node in CACHE_FILE so a corpus is read once, not
# at every check of a recipe's identity. Never used for written shards (the loader's checksums
# must read the bytes: bit rot changes no mtime).
CACHE_FILE = "input-sha256.jsonl"
_known: dict[tuple, str] | None = None


def input_sha256(path: str | Path) -> str:
    """The sha256 of an input file's bytes, read once per node while the file is unchanged."""
    from orchestration.data.shards import file_sha256
    from tokenizer.train import default_cache_dir

    global _known
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    cache = default_cache_dir() / CACHE_FILE
    if _known is None:
        _known = {}
        try:
            for line in cache.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                _known[tuple(entry["key"])] = entry["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache yet, or a torn line: what was read stays, the rest is recomputed
    if key not in _known:
        _known[key] = file_sha256(path)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "a", encoding="utf-8") as f:  # one short append per file: whole lines
                f.write(json.dumps({"key": list(key), "sha256": _known[key]}) + "\n")
        except OSError:
            pass  # a read-only home: only this process remembers
    return _known[key]


def path_digest(path: str | Path) -> str:
    """The content of an input: a file's sha256, a folder's over each file's relative path and
    sha256 (hidden entries included: a folder is what it holds)."""
    path = Path(path)
    if path.is_file():
        return input_sha256(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return _digest([(f.relative_to(path).as_posix(), input_sha256(f)) for f in files])


def content_hash(tokenizer: dict, sources: dict) -> str:
    """SHA-256 over the tokenizer and each source's shard hashes, in order."""
    return _digest(
        {
            "tokenizer": tokenizer["sha256"],
            "sources": {
                name: [s["sha256"] for s in src["shards"]] for name, src in sources.items()
            },
        }
    )


def read_manifest(dataset: str | Path) -> dict:
    """The manifest of a dataset folder; DataError when it is missing, unreadable, of another
    format or version, or without its `sources` table."""
    path = Path(dataset) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{dataset}: not a hanyeong dataset (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{path}: version {manifest.get('version')!r}, this hanyeong reads {VERSION}"
        )
    if not isinstance(manifest.get("sources"), dict):
        raise DataError(f"{path}: no 'sources' table")
    return manifest


def intact(dataset: Path, manifest: dict) -> bool:
    """Every shard the manifest lists is there with its SHA-256."""
    from orchestration.data.shards import file_sha256

    for source in manifest["sources"].values():
        for shard in source["shards"]:
            path = dataset / shard["path"]
            if (
                not path.is_file()
                or path.stat().st_size != shard["bytes"]
                or file_sha256(path) != shard["sha256"]
            ):
                return False
    return True


def up_to_date(dataset: Path, fingerprint: str) -> dict | None:
    """The existing manifest when `dataset` was built from the same inputs and is intact, else None."""
    try:
        manifest = read_manifest(dataset)
    except DataError:
        return None
    if manifest.get("inputs_hash") == fingerprint and intact(dataset, manifest):
        return manifest
    return None


def staging_dir(dataset: Path) -> Path:
    """A fresh temporary folder beside `dataset` (same filesystem, so the final rename is atomic)."""
    dataset.parent.mkdir(parents=True, exist_ok=True)
    tmp = dataset.with_name(f".{dataset.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def check_replaceable(dataset: Path) -> None:
    """Refuse to overwrite a folder that holds something other than a hanyeong dataset."""
    if dataset.exists() and (
        not dataset.is_dir() or (any(dataset.iterdir()) and not (dataset / MANIFEST).is_file())
    ):
        raise DataError(
            f"{dataset}: exists and is not a hanyeong dataset (no {MANIFEST}); refusing to replace it"
        )


def publish(tmp: Path, dataset: Path, manifest: dict) -> None:
    """Write the manifest into `tmp`, then move `tmp` to `dataset`, replacing an older dataset."""
    from hanyeong.files import write_atomic

    write_atomic(tmp / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    check_replaceable(dataset)
    old = dataset.with_name(f".{dataset.name}.old-{os.getpid()}")
    if dataset.exists():
        os.replace(dataset, old)
    os.replace(tmp, dataset)
    shutil.rmtree(old, ignore_errors=True)
