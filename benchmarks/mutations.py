"""Mutation testing of the modules that carry the laws: does a deliberate one-line bug fail a test?

    python benchmarks/mutations.py                      # the default modules (about 20 min on 2 cores)
    python benchmarks/mutations.py --modules tokenizer/stream.py orchestration/data/dedup.py
    python benchmarks/mutations.py --modules all        # every module in MODULES (hours)
    python benchmarks/mutations.py --list               # the mutants, without running anything
    python benchmarks/mutations.py --modules M --survivors   # after new assertions: rerun M's survivors only
    python benchmarks/mutations.py --modules M --resume      # go on with a run that was stopped early

Each module is parsed, and each mutant is one change to its syntax tree, as mutmut makes them:
a comparison flipped (< to <=, == to !=, in to not in), an operator swapped (+ to -, * to /, & to |,
and to or), `not` or a unary minus dropped, a number n to n + 1, True to False, a string that is not
an error message or docstring to "XX...XX", a `return x` to `return None`, a call statement removed,
break to continue. The mutated module is written (ast.unparse) into a copy of the working tree and
the module's own tests (MODULES) run in a fresh `pytest -x` there: a failing test kills the mutant,
passing tests let it survive, a run over its time limit (3 x the unmutated run + 30 s, then once
more at 3 x that, as a shared machine can be slow for a while) is a timeout. Docstrings, type
annotations and the text of raised errors are not mutated.

Not mutmut: mutmut 3 runs each mutant in a worker forked from a process that has already imported
and run the code under test, and the tests here start the Rust `tokenizers` thread pool and torch's
OpenMP pool, which do not survive a fork; it also collects which test reaches which function by
running the whole test suite once first (about 16 minutes here). A plain pytest process per mutant
is slower per mutant but needs no such care, and the mutants are the same kinds.

The run is polite to a shared machine: niced to 19, one test process at a time, one thread each
(OMP, MKL, Rayon). Hypothesis runs derandomized (CI=true: tests/conftest.py's "ci" profile), so a
mutant is killed or not the same way every run. Tests that need ../shared/data skip unless
--shared. Survivors are listed with their line; those judged equivalent (no test can tell them from
the original) are marked in EQUIVALENT with the reason, and the kill rate counts only the others;
a survivor left alive for another reason is in NOT_KILLED with it, and counts against the rate.

Mutants run in a seeded random order: a run stopped early (--minutes, Ctrl-C, `kill`) writes what
ran, a random sample of the module's mutants, and its row says how many ran.

Results: benchmarks/results/mutations-<machine>.{json,md}, merged per module: a run replaces the rows
of the modules it ran and keeps the others, each row with its date and command, and the numbers of
the module's first run (before its survivors were looked at). `--rejudge FILE` applies EQUIVALENT
and NOT_KILLED anew without running anything.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hardware import cpu_name, machine_name  # benchmarks/hardware.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# module -> the tests that own its laws (run with -x, in this order: quick, sharp tests first)
MODULES = {
    "tokenizer/bbpe.py": ["tests/tokenizer/test_laws.py"],
    "tokenizer/stream.py": ["tests/tokenizer/test_laws.py"],
    "orchestration/data/decontaminate.py": ["tests/orchestration/data/test_decontaminate.py"],
    "orchestration/data/dedup.py": ["tests/orchestration/data/test_dedup.py"],
    # being refactored when this was written (issue 12): run them with --modules once settled
    "orchestration/data/fingerprint.py": ["tests/orchestration/data/test_fingerprint.py",
                                          "tests/orchestration/data/test_dedup.py",
                                          "tests/orchestration/data/test_decontaminate.py"],
    "orchestration/core/spec.py": ["tests/orchestration/test_spec.py"],
    "orchestration/core/optim.py": ["tests/orchestration/test_optim.py"],
    "orchestration/core/checkpoint.py": ["tests/orchestration/test_checkpoint.py",
                                         "tests/cuda_model/test_checkpoint_io.py"],
    "orchestration/data/loader.py": ["tests/orchestration/data/test_loader.py",
                                     "tests/orchestration/data/test_loader_streaming.py",
                                     "tests/orchestration/data/test_loader_order.py"],
    "orchestration/data/token_cache.py": ["tests/orchestration/data/test_loader_streaming.py",
                                          "tests/orchestration/data/test_loader.py"],
    "cuda_model/losses.py": ["tests/cuda_model/test_losses.py", "tests/cuda_model/test_preference_losses.py",
                             "tests/cuda_model/test_reward.py", "tests/cuda_model/test_grpo_loss.py",
                             "tests/cuda_model/test_distill_losses.py", "tests/cuda_model/test_step.py",
                             "tests/mlx_model/test_parity.py::test_both_backends_have_the_same_losses_reading_the_same_arrays",
                             "tests/mlx_model/test_parity.py::test_packed_and_masked_losses_match_torch",
                             # MLX's losses, written apart, compared with these: a bug in either shows
                             "tests/mlx_model/test_preference_losses.py", "tests/mlx_model/test_reward.py",
                             "tests/mlx_model/test_grpo_loss.py", "tests/mlx_model/test_distill_losses.py"],
    "cuda_model/step.py": ["tests/cuda_model/test_step.py", "tests/cuda_model/test_model.py",
                           "tests/cuda_model/test_parallel.py",  # DDP/FSDP paths
                           "tests/cuda_model/test_checkpoint_io.py",
                           "tests/orchestration/test_carry_optimizer.py::test_carried_moments_train_as_one_longer_stage[torch]"],  # fmt: skip
    "mlx_model/losses.py": ["tests/mlx_model/test_step.py", "tests/mlx_model/test_preference_losses.py", "tests/mlx_model/test_reward.py",
                            "tests/mlx_model/test_grpo_loss.py", "tests/mlx_model/test_distill_losses.py",
                            "tests/mlx_model/test_model.py", "tests/mlx_model/test_parity.py"],
    "mlx_model/step.py": ["tests/mlx_model/test_step.py", "tests/mlx_model/test_model.py", "tests/mlx_model/test_parity.py",
                          "tests/mlx_model/test_distributed.py::test_data_parallel_law_two_ranks_step_as_one_process_on_the_whole_batch",
                          "tests/orchestration/test_carry_optimizer.py::test_carried_moments_train_as_one_longer_stage[mlx]"],  # fmt: skip
}  # fmt: skip
DEFAULT = ["tokenizer/bbpe.py", "tokenizer/stream.py", "orchestration/data/decontaminate.py",
           "orchestration/data/dedup.py"]  # fmt: skip

# (module, source line, change) -> why no test can tell the mutant from the original. Keyed by the
# line's text, not its number, so edits elsewhere in the module keep them; a changed line is judged anew.
_PERF = "performance only: the bitmap is a screen whose every hit is confirmed by binary search and string comparison"
_BANDS = "performance only: band hashes only pick candidates, each confirmed by its estimated similarity"
_MIX = ("another invertible mixing step: the same estimates (mean error over 300 pairs 0.0066 and 0.0056 "
        "against 0.0056, noise 0.0023)")
_EMPTY = "the placeholders of an index without windows: its all-zero bitmap screens out every window"
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("tokenizer/bbpe.py", "write_atomic(directory / TOKENIZER_FILE, self.hf.to_str(pretty=True))", "True -> False"):
        "layout of the JSON file only: the same tokenizer is read back",
    ("tokenizer/bbpe.py", "write_atomic(directory / CONFIG_FILE, json.dumps(self.config, ensure_ascii=False, indent=2))",
     "False -> True"): "\\u escapes instead of UTF-8 in the JSON file: the same config is read back",
    ("tokenizer/bbpe.py", "write_atomic(directory / CONFIG_FILE, json.dumps(self.config, ensure_ascii=False, indent=2))",
     "2 -> 3"): "indentation of the JSON file only",
    **{("orchestration/data/decontaminate.py", line, change): _EMPTY for line, change in [
        ("hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # sorted", "0 -> 1"),
        ("owners: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))  # item of each hash", "0 -> 1"),
        ("bitmap: np.ndarray = field(default_factory=lambda: np.zeros(1, np.uint8))", "1 -> 2"),
        ("shift: int = 61", "61 -> 62")]},
    **{("orchestration/data/decontaminate.py", line, change): _PERF for line, change in [
        ("bits = max(16, min(34, int(np.ceil(np.log2(len(index.hashes) * 32)))))", "* -> /"),
        ("bits = max(16, min(34, int(np.ceil(np.log2(len(index.hashes) * 32)))))", "16 -> 17"),
        ("bits = max(16, min(34, int(np.ceil(np.log2(len(index.hashes) * 32)))))", "32 -> 33"),
        ("bits = max(16, min(34, int(np.ceil(np.log2(len(index.hashes) * 32)))))", "34 -> 35"),
        ("index.shift = 64 - bits", "- -> +"), ("index.shift = 64 - bits", "64 -> 65"),
        ("index.bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)", "- -> +"),
        ("index.bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)", "1 -> 2"),
        ("(ix.bitmap[slots >> np.uint64(3)] >> (slots & np.uint64(7)).astype(np.uint8)) & 1", "& -> |")]},
    ("orchestration/data/decontaminate.py", "if len(ix.hashes) and normalized:", "and -> or"):
        "a shortcut: without hashes nothing passes the screen, without documents nothing is found",
    ("orchestration/data/decontaminate.py", "if found[d] is None and len(text) < W and text in ix.short:", "< -> <="):
        "short items are shorter than a window: a text of exactly W characters is never one",
    ("orchestration/data/decontaminate.py", "if d in best and best[d][0] <= earliest[k]:", "<= -> <"):
        "skips less work: the inner loop breaks at once on the same item",
    ("orchestration/data/decontaminate.py", "if d in best and item >= best[d][0]:", ">= -> >"):
        "reached only when a 64-bit hash collision puts an earlier item first; it then reports another "
        "window of the same item",
    ("orchestration/data/decontaminate.py", "break", "break -> continue"):
        "the items after it are all later than the best one: the loop breaks on the next",
    ("orchestration/data/dedup.py", "BUCKET_CAP = 16  # kept documents remembered per band hash; bounds the comparisons per query",
     "16 -> 17"): "a tuning constant; the tests read it",
    **{("orchestration/data/dedup.py", "ROWS_PER_PASS = 1 << 14  # shingles permuted at once: a (ROWS_PER_PASS, num_perm) "
        "uint32 temporary", change): "the size of a pass, not its result" for change in ("1 -> 2", "14 -> 15")},
    ("orchestration/data/dedup.py", "best, best_error = (1, num_perm), float(\"inf\")", "1 -> 2"):
        "overwritten by the first pair (its error is below infinity)",
    ("orchestration/data/dedup.py", "for bands in range(1, num_perm + 1):", "1 -> 2"):
        "the second 1 (the first is killed): bands = num_perm + 1 has no rows, num_perm // bands = 0",
    ("orchestration/data/dedup.py", "if fp + fn < best_error:", "< -> <="):
        "only a tie would tell, and no two (bands, rows) pairs have equal error on the 53 (threshold, num_perm) "
        "pairs compared with datasketch",
    **{("orchestration/data/dedup.py", line, "201 -> 202"): "one more point of the trapezoid rule: the same "
        "(bands, rows) on all 53 pairs compared with datasketch" for line in (
            "below = np.linspace(0.0, threshold, 201)", "above = np.linspace(threshold, 1.0, 201)")},
    **{("orchestration/data/dedup.py", line, change): _MIX for line, change in [
        ("v ^= v >> np.uint32(16)", ">> -> <<"), ("v ^= v >> np.uint32(13)", ">> -> <<"),
        ("v ^= v >> np.uint32(13)", "13 -> 14")]},
    ("orchestration/data/dedup.py", "self.a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32) | np.uint32(",
     "0 -> 1"): "one fewer possible multiplier",
    ("orchestration/data/dedup.py", "self.b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)", "0 -> 1"):
        "one fewer possible offset",
    ("orchestration/data/dedup.py", "keep = positions + k <= ends[np.minimum(owner, D - 1)] if D else positions < 0",
     "0 -> 1"): "without texts there are no positions",
    ("orchestration/data/dedup.py", "keep = positions + k <= ends[np.minimum(owner, D - 1)] if D else positions < 0",
     "< -> <="): "without texts there are no positions",
    ("orchestration/data/dedup.py", "fp = _integrate(1 - (1 - below**rows) ** bands, below)", "1 -> 2"):
        "the outer 1: adds the same constant to every (bands, rows) pair's error, so the same pair wins",
    ("orchestration/data/dedup.py", "fn = _integrate(1 - (1 - (1 - above**rows) ** bands), above)", "1 -> 2"):
        "the outer two 1s: add the same constant to every (bands, rows) pair's error, so the same pair wins",
    ("orchestration/data/dedup.py", "keep = positions + k <= ends[np.minimum(owner, D - 1)] if D else positions < 0",
     "- -> +"): "owner never exceeds D - 1 (the last window starts k before the end): the clamp never acts",
    ("orchestration/data/dedup.py", "(1024, config.num_perm), dtype=np.uint32", "1024 -> 1025"):
        "the store's first capacity; it grows when full",
    **{("orchestration/data/dedup.py", line, change): _BANDS for line, change in [
        ("0, 2**63, size=self.rows, dtype=np.uint64", "0 -> 1"), ("0, 2**63, size=self.rows, dtype=np.uint64", "** -> *"),
        ("0, 2**63, size=self.rows, dtype=np.uint64", "63 -> 64"),
        ("mix = np.random.default_rng(config.seed + 1).integers(", "1 -> 2"),
        ("self.band_mix = mix * np.uint64(2) + np.uint64(1)", "+ -> -"),
        ("self.band_mix = mix * np.uint64(2) + np.uint64(1)", "* -> /"),
        ("self.band_mix = mix * np.uint64(2) + np.uint64(1)", "1 -> 2"),
        ("self.band_mix = mix * np.uint64(2) + np.uint64(1)", "2 -> 3"),
        ("sig[:, :usable].reshape(len(normalized), self.bands, self.rows).astype(np.uint64)", "* -> /")]},
    ("orchestration/core/spec.py", "medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)", ">= -> >"):
        "at the high-frequency edge smooth is 1, and the medium band's formula keeps the frequency as the "
        "high band does: bit-identical frequencies with the edge hit exactly (60 scalings tried)",
    ("orchestration/core/spec.py", 'Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\\n", encoding="utf-8")',
     "2 -> 3"): "indentation of spec.json only: the same spec is read back; hashes are of a checkpoint's own file",
    ("orchestration/core/optim.py", "if step < decay_start:", "< -> <="):
        "at decay_start the linear decay gives peak + (floor - peak) * 0 = peak exactly, as the flat part does",
    **{("orchestration/core/checkpoint.py", line, "call removed"): "durability against a power loss only: the "
        "files and their index are the same, and no test can cut the power" for line in (
            "_fsync_dir(tmp)", "os.fsync(handle.fileno())")},
    **{("orchestration/core/checkpoint.py", "for block in iter(lambda: f.read(1 << 20), b\"\"):", change):
        "the size of a read, not the digest of the whole file" for change in ("1 -> 2", "20 -> 21")},
    **{("orchestration/core/checkpoint.py", line, "2 -> 3"): "indentation of the JSON file only: the same dict is "
        "read back (and a checkpoint.json's hash, a stage identity, is of the file as written)" for line in (
            '(tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\\n", encoding="utf-8")',
            '(directory / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\\n", encoding="utf-8")')},
    ("orchestration/core/checkpoint.py", "if (d / INDEX_FILE).is_file() else 0.0)  # fmt: skip", "0.0 -> 1.0"):
        "the sort key of an .old folder without an index (never restored): below any real file's mtime either way",
    # cuda_model/step.py
    **{("cuda_model/step.py", line, change): "a default every caller overrides (init_train_state passes each "
        "field; the backend passes seed, activation_checkpointing and the loss; the LR is set before each step)"
        for line, change in (("seed: int = 0", "0 -> 1"), ("compile: bool = False", "False -> True"),
                             ("world: int = 1", "1 -> 2"), ("rank: int = 0", "0 -> 1"),
                             ("activation_checkpointing: bool = False", "False -> True"),
                             ("seed: int = 0,", "0 -> 1"), ("activation_checkpointing: bool = False,", "False -> True"),
                             ('def train_step(state: TrainState, batch: Tensors, loss: str = "causal_lm") -> dict[str, float]:',
                              "'causal_lm' -> 'XXcausal_lmXX'"),
                             ("def optimizer_tensors(state: TrainState, keep: bool = True) -> dict[str, torch.Tensor]:",
                              "True -> False"),
                             ("return torch.optim.AdamW(groups, lr=lr_at(optim, 0), betas=optim.betas, eps=optim.eps, "
                              "**kernel)", "0 -> 1"))},
    **{("cuda_model/step.py", "rank, world = par.world() if parallel else (0, 1)", change): "the rank and world of "
        "a state alone, read only by the parallel paths (the gradient rescale, FSDP's save)" for change in ("0 -> 1", "1 -> 2")},
    ("cuda_model/step.py", "state.model.train()", "call removed"): "no dropout: train or eval mode changes no "
        "number (activation checkpointing, which only recomputes in training, recomputes the same values)",
    ("cuda_model/step.py", "state.optimizer.zero_grad(set_to_none=True)", "True -> False"): "gradients zeroed "
        "instead of freed: the same next gradients (memory only)",
    ("cuda_model/step.py", "if not any(par.is_sharded(g) for g in grads):", "drop not"): "either branch gives the "
        "same norm and clipping: clip_grad_norm_ reduces DTensor gradients to the full norm itself, and on plain "
        "tensors full_tensor is the identity",
    **{("cuda_model/step.py", line, "True -> False"): "the foreach kernels against the per-tensor loop: the same "
        "arithmetic" for line in ("return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).item()",
                                  "norm = par.full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))",
                                  "torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)")},
    # mlx_model/step.py
    **{("mlx_model/step.py", line, change): "a default every caller overrides (init_train_state passes each "
        "field; the backend passes seed, compile, activation_checkpointing and the loss)"
        for line, change in (("seed: int = 0", "0 -> 1"), ("compile: bool = True", "True -> False"),
                             ("activation_checkpointing: bool = False", "False -> True"),
                             ("seed: int = 0,", "0 -> 1"), ("activation_checkpointing: bool = False,", "False -> True"),
                             ('def train_step(state: TrainState, batch: Batch, loss: str = "causal_lm") -> dict[str, float]:',
                              "'causal_lm' -> 'XXcausal_lmXX'"))},
    ("mlx_model/step.py", 'dtype = mx.int32 if kind in "iu" else mx.float32 if kind == "f" else None',
     "'iu' -> 'XXiuXX'"): "a dtype's kind is one character: 'i' and 'u' are in 'XXiuXX' too",
    **{("mlx_model/step.py", line, "call removed"): "MLX is lazy: the same graph is evaluated at the next "
        ".item() or step (when, not what)" for line in (
            "mx.eval(total, count, norm, tokens, extra, state.model.parameters(), state.optimizer.state)",
            "mx.eval(current)")},
    **{("orchestration/data/token_cache.py", line, "call removed"): "durability against a power loss only: the same files are renamed into "
        "place (a write's buffer is flushed at close, before the rename), and no test can cut the power"
        for line in ("os.fsync(f.fileno())", "os.fsync(fd)", "f.flush()")},
    ("orchestration/data/token_cache.py", "if stop <= starts[k + 1]:  # the loader's case, inlined: a document piece inside one shard", "<= -> <"):
        "a piece ending exactly at its shard's end takes the general path: the same one read of the same bytes",
    ("orchestration/data/token_cache.py", "for wait in (False, True):", "False -> True"): "the first pass waits for each lock as the second "
        "does: the same entries, each built once, but one after another across processes (time only)",
    ("orchestration/data/token_cache.py", "path.parent.mkdir(parents=True, exist_ok=True)", "True -> False"): "the parent's parent (the cache "
        "folder) exists whenever a json is written: parents never acts (exist_ok=False is killed)",
    ("orchestration/data/token_cache.py", "return False", "return None"): "the callers of both (acquire and "
        "_still_checked) read the answer as a truth value: None is false as False is",
    **{("orchestration/data/token_cache.py", "READ_BUFFER = 1 << 20", change): "pyarrow's read buffer (0: unbuffered reads): the "
        "same bytes decoded" for change in ("<< -> >>", "1 -> 2", "20 -> 21")},
    **{("orchestration/data/token_cache.py", 'CACHE_FORMAT, CACHE_VERSION = "hanyeong-token-cache", 1', change): "the name and version an "
        "entry is written with and read back against, one constant for both" for change in
        ("'hanyeong-token-cache' -> 'XXhanyeong-token-cacheXX'", "1 -> 2")},
    **{("orchestration/data/token_cache.py", line, change): "the inlined read's length check then fails and _read reads the same bytes "
        "(and counts the one read): time only" for line, change in (
            ("data = os.pread(self._fds[k], (stop - start) * width, (start - starts[k]) * width)", "- -> +"),
            ("if len(data) == (stop - start) * width:", "* -> /"),
            ("if len(data) == (stop - start) * width:", "- -> +"))},
    **{("orchestration/data/token_cache.py", line, "False -> True"): "an entry's repr only (it would print its open files)" for line in (
        "tokens: object = field(repr=False)", "mask: object = field(default=None, repr=False)",
        "stats: dict = field(repr=False)")},
    **{("orchestration/data/token_cache.py", "masks = TokenFile(np.int8, [e.mask for e in full], counts, 0, 1)", change):
        "the loss mask column's recorded smallest and largest values: nothing reads them (the vocabulary check "
        "reads the tokens')" for change in ("0 -> 1", "1 -> 2")},
    ("orchestration/data/token_cache.py", 'return cache_dir / "checked" / f"{name}.json"', "'checked' -> 'XXcheckedXX'"): "the folder of the "
        "checked stamps, written and read by this one function",
    ("orchestration/data/token_cache.py", 'racy = stat.st_mtime_ns + RACY_NS > stamp["checked_ns"]', "> -> >="): "the one nanosecond at the "
        "edge of a 2-second margin: either side of it is safe",
    **{("orchestration/data/token_cache.py", 'built_from = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}',
        change): "a record for people reading an entry's json: nothing reads it" for change in (
            "'path' -> 'XXpathXX'", "'size' -> 'XXsizeXX'", "'mtime_ns' -> 'XXmtime_nsXX'")},
    ("orchestration/data/token_cache.py", '_write_file(cache_dir / f"{sha256}.json", json.dumps(record, indent=1).encode())', "1 -> 2"):
        "indentation of an entry's json only",
    ("orchestration/data/token_cache.py", 'if column.null_count or str(getattr(column.type, "value_type", "")) != "int32":', "'' -> 'XXXX'"):
        "a type without value_type is refused either way: neither '' nor 'XXXX' is 'int32'",
    ("orchestration/data/token_cache.py", "wait: bool = True) -> ShardEntry | None:  # fmt: skip", "True -> False"): "a default the one "
        "caller (open_shards) overrides: it passes wait on each pass",
    ("orchestration/data/token_cache.py", "fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self._byte(sha256))", "1 -> 2"): "a process holds one "
        "entry's byte at a time (open_shard releases it before the next): unlocking one byte more frees nothing held",
    ("orchestration/data/token_cache.py", "return int(sha256[:12], 16) if len(sha256) >= 12 else 0", "0 -> 1"): "never reached: a sha256 here "
        "is 64 hex digits",
    ("orchestration/data/token_cache.py", '"built_from": built_from}  # fmt: skip', "'built_from' -> 'XXbuilt_fromXX'"): "a record for people "
        "reading an entry's json: nothing reads it",
    ("orchestration/data/token_cache.py", 'fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")',
     "'.tmp' -> 'XX.tmpXX'"): "the temporary file's suffix: it is renamed into place or deleted either way",
    ("orchestration/data/token_cache.py", 'if column.null_count or str(getattr(column.type, "value_type", "")) != "int8":', "'' -> 'XXXX'"):
        "a type without value_type is refused either way: neither '' nor 'XXXX' is 'int8'",
    ("orchestration/data/token_cache.py", "return entry", "return None"): "after an entry was built: open_shards "
        "takes None as 'not yet' and opens the entry on its second pass, from the files just written (time only; "
        "the same mutation of the cache-hit return is killed: a second loader gets None twice)",
    ("orchestration/data/token_cache.py", "values = column.values.to_numpy(zero_copy_only=True)[bounds[0] : bounds[-1]]", "True -> False"):
        "a copy where none is needed (memory only): the same values",
    ("orchestration/data/token_cache.py", "yield bounds - bounds[0], values, mask", "- -> +"): "pyarrow's Parquet reader decodes each batch "
        "into fresh arrays whose offsets start at 0, even a 50-row row group read 8 rows at a time "
        "(test_a_shard_is_hashed_and_decoded_in_blocks_never_whole): the rebase is defensive",
    ("orchestration/data/token_cache.py", "for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=columns, use_threads=False):",
     "False -> True"): "Arrow's decoding threads: the same batches",
    ("orchestration/data/token_cache.py", "values = column.values.to_numpy(zero_copy_only=False)[mask_bounds[0] : mask_bounds[-1]]",
     "False -> True"): "int8 values without nulls (checked just above) convert without a copy: the same array",
    ("orchestration/data/token_cache.py", 'files.append(open(f"{base}.{column}", "rb", buffering=0))  # noqa: SIM115  (held open while '
     'the loader lives)', "0 -> 1"): "a buffered reader over the same file (Python warns that line buffering "
        "is not for binary files): every read is an os.pread on its descriptor or np.fromfile from offset 0",
    ("orchestration/data/token_cache.py", "pa.default_memory_pool().release_unused()  # the read batches' buffers, else kept around",
     "call removed"): "memory only: Arrow's pool keeps freed buffers for reuse",
    ("orchestration/data/token_cache.py", "READ_ROWS = 128", "128 -> 129"): "documents per read batch (memory only): the tests set their own "
        "to cross batch edges",
    ("orchestration/data/token_cache.py", "if len(values) > bounds[-1] - bounds[0]:", "- -> +"): "the batch's offsets start at 0 (see the "
        "rebase in read_shard): bounds[0] is 0 and the check is the same",
    ("orchestration/data/token_cache.py", "f.close()", "call removed"): "only the close in build_shard's finally survives (the others are "
        "killed): those are NamedTemporaryFile objects, which close themselves, silently, when build_shard returns "
        "(CPython frees them at once); the entry is read through new handles",
    ("orchestration/data/token_cache.py", "RACY_NS = 2_000_000_000", "2000000000 -> 2000000001"): "a nanosecond more of a 2-second margin",
    **{("orchestration/data/token_cache.py", "return int(sha256[:12], 16) if len(sha256) >= 12 else 0", change):
        "another byte of the lock file per entry: distinct entries still lock distinct bytes (a clash, about 1 in "
        "2^48, would only serialize two builds)" for change in ("12 -> 13", "16 -> 17")},
    ("orchestration/data/token_cache.py", "return int(sha256[:12], 16) if len(sha256) >= 12 else 0", ">= -> >"): "a sha256 reaching here is "
        "64 hex digits (checked when the manifest is read): >= 12 and > 12 agree",
    ("orchestration/data/token_cache.py", "name = hashlib.blake2b(str(path.resolve()).encode(), digest_size=16).hexdigest()", "16 -> 17"):
        "a longer name for a shard's checked stamp, written and read by this one function",
    ("orchestration/data/token_cache.py", 'suffix=".tmp", delete=False)', "'.tmp' -> 'XX.tmpXX'"): "the temporary files' suffix: each is "
        "renamed into place or deleted either way",
    # orchestration/data/fingerprint.py
    **{("orchestration/data/fingerprint.py", "BASE = 0x9E3779B97F4A7C15 | 1  # odd: invertible modulo 2^64", change):
        "another odd base (0x…17 either way): other hashes, the same laws; no window hash is stored"
        for change in ("1 -> 2", "11400714819323198485 -> 11400714819323198486")},
    **{("orchestration/data/fingerprint.py", "CHUNK = 1 << 20  # windows hashed per numpy pass; bounds the temporary "
        "arrays to ~40 MB", change): "the chunk size (memory only): test_fingerprint.py sets its own to cross "
        "chunk edges" for change in ("20 -> 21", "1 -> 2")},
    ("orchestration/data/fingerprint.py", "if n <= 0:", "<= -> <"): "n = 0 runs no chunk: the same empty array",
    ("orchestration/data/fingerprint.py", "span = CHUNK + width - 1", "- -> +"): "each chunk hashes two windows "
        "more, and the next chunk writes the same hashes over them",
    ("orchestration/data/fingerprint.py", "return owner, inside & (owner < len(ends))", "< -> <="): "an owner of "
        "len(ends) (a start past the last end) is clamped to the last text, whose end the window cannot fit "
        "before: inside is False either way",
    # cuda_model/losses.py
    **{("cuda_model/losses.py", "CHUNK_ELEMENTS = 1 << 26  # logits per chunk of the fused head + loss (256 MB in fp32)",
        change): "the size of a chunk (1 >> 26 = 0: chunks of one row), not the sums: test_losses.py sets its own "
        "to make many ragged chunks" for change in ("<< -> >>", "1 -> 2", "26 -> 27")},
    ("cuda_model/losses.py", "if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):", "and -> or"):
        "the training kernel in evaluation: the same chunked sum, with gradients computed and dropped (time only)",
    **{("cuda_model/losses.py", "chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])", change): "the size of a "
        "chunk, not the sums" for change in ("1 -> 2", "0 -> 1")},
    ("cuda_model/losses.py", "onehot = torch.arange(x.shape[-1], device=x.device)[None, :] == targets[:, None]",
     "drop unary -"): "the logits are (rows, V): shape[1] is shape[-1]",
    ("cuda_model/losses.py", 'if not (COMPILE_HEAD_KERNEL and device.type == "cuda"):', "drop not"):
        "picks the compiled kernel or the eager one, the same function (test_losses.py holds them equal): time only",
    ("cuda_model/losses.py", "if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):", "or -> and"):
        "with one input frozen the evaluation path is taken, and autograd differentiates it (the plain chunked "
        "cross-entropy): the same gradients, holding each chunk's logits (memory only)",
    **{("cuda_model/losses.py", line, "drop unary -"): "the logits are (rows, V): dim 1 is dim -1" for line in (
        "lse = torch.logsumexp(x, dim=-1)", "lse = torch.logsumexp(x, dim=-1, keepdim=True)")},
    **{(module, "logps, lengths = per_token.sum(-1), mask.sum(-1)", "drop unary -"): "the arrays are (2B, T): "
        "axis 1 is axis -1" for module in ("cuda_model/losses.py", "mlx_model/losses.py")},
    ("mlx_model/losses.py", "weight = batch[\"row_count\"] / mx.maximum(mask.sum(-1), 1.0)  # a metric's token mean per answer",
     "drop unary -"): "the mask is (B, T): axis 1 is axis -1",
    ("cuda_model/losses.py", "weight = batch[\"row_count\"] / mask.sum(-1).clamp(min=1.0)  # a metric's token mean per answer",
     "drop unary -"): "the mask is (B, T): dim 1 is dim -1",
    ("cuda_model/losses.py", 'loss = (batch["token_weight"] * (per_token * mask).sum(-1)).sum()', "drop unary -"):
        "the per-token losses are (B, T): dim 1 is dim -1",
    ("cuda_model/losses.py", "metrics = {name: (weight * (v.detach() * mask).sum(-1)).sum() for name, v in values.items()}",
     "drop unary -"): "the per-token values are (B, T): dim 1 is dim -1",
    ("mlx_model/losses.py", 'loss = (batch["token_weight"] * (per_token * mask).sum(-1)).sum()', "drop unary -"):
        "the per-token losses are (B, T): axis 1 is axis -1",
    **{(module, line, "drop unary -"): "the mask is (B, T): argmax over axis 1 is over axis -1" for module, line in (
        ("cuda_model/losses.py", "return (positions * (mask > 0)).argmax(-1)"),
        ("mlx_model/losses.py", "return mx.argmax(positions * (mask > 0), axis=-1)"))},
    ("orchestration/data/loader.py", "kept = np.ones(len(self.offsets) - 1, bool)", "- -> +"): "two more trailing "
        "entries in `train`, never indexed: draws index it below `documents`, counted from the offsets",
    ("mlx_model/losses.py", "metrics = {name: mx.stop_gradient((weight * (v * mask).sum(-1)).sum()) for name, v in "
     "values.items()}", "drop unary -"): "the per-token values are (B, T): axis 1 is axis -1",
    # mlx_model/losses.py
    ("mlx_model/losses.py", "def dpo_pair_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):",
     "0.0 -> 1.0"): "a default the only caller (dpo) overrides with the batch's label_smoothing",
}  # fmt: skip

# (module, source line, change) -> why a survivor that is NOT equivalent is left alive: a test could
# tell it, but only by pinning a recorded result (a golden), which these laws do not do. It counts
# against the kill rate; the report lists it with this reason.
NOT_KILLED: dict[tuple[str, str, str], str] = {
    **{("cuda_model/step.py", line, change): "CUDA only (bf16 autocast, the device's defaults): "
        "tests/cuda_model/test_gpu.py holds them on a GPU; no GPU here"
        for line, change in (('if device.type == "cuda":', "== -> !="), ('if device.type == "cuda":', "'cuda' -> 'XXcudaXX'"),
                             ('return torch.autocast("cuda", dtype=torch.bfloat16)', "return None"),
                             ('return torch.autocast("cuda", dtype=torch.bfloat16)', "'cuda' -> 'XXcudaXX'"),
                             ('on_cuda = next(model.parameters()).device.type == "cuda"', "'cuda' -> 'XXcudaXX'"),
                             ('mixed_precision = env_flag(ENV_FSDP_BF16, on_cuda) and parallel == "fsdp"', "== -> !="),
                             ('mixed_precision = env_flag(ENV_FSDP_BF16, on_cuda) and parallel == "fsdp"',
                              "'fsdp' -> 'XXfsdpXX'"))},
    **{("cuda_model/losses.py", line, change): "CUDA only: the compiled head kernel is never used off a GPU; "
        "tests/cuda_model/test_gpu.py compares it there"
        for line, change in (("COMPILE_HEAD_KERNEL = False  # set by step.init_train_state(compile=True): process-wide, "
                              "CUDA only", "False -> True"), ("return _compiled_kernel", "return None"),
                             ("if _compiled_kernel is None:", "is -> is not"),
                             ("_compiled_kernel = torch.compile(chunk_nll_grad_fusable, dynamic=False)", "False -> True"))},
    **{("cuda_model/losses.py", 'if not (COMPILE_HEAD_KERNEL and device.type == "cuda"):', change):
        "CUDA only: off a GPU the head kernel is the eager one either way" for change in ("and -> or", "== -> !=",
                                                                               "'cuda' -> 'XXcudaXX'")},
    ("cuda_model/step.py", "torch._foreach_div_(grads, max(n, 1.0))", "1.0 -> 2.0"): "a parallel global batch "
        "with fewer than 2 counted targets; the single-process twin of this line is killed by "
        "test_the_step_means_loss_gradient_and_metrics_over_the_counted_targets[1]",
}  # fmt: skip

COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}  # fmt: skip
BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.Div, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
          ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd}  # fmt: skip
SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
          ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
          ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>",
          ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.And: "and", ast.Or: "or"}  # fmt: skip


@dataclass
class Mutant:
    module: str
    site: int  # the node's index in ast.walk order of the parsed module
    detail: int  # which operator of a comparison chain
    line: int
    change: str
    source: str  # the original line
    status: str = "not run"  # killed | survived | timeout | error (killed: the module does not import)
    seconds: float = 0.0
    killer: str = ""  # the first failing test
    equivalent: str = ""  # why it is equivalent, for a survivor judged so
    not_killed: str = ""  # why a survivor that is not equivalent is left alive (NOT_KILLED)
    first: str = ""  # the status of its first run, before survivors were looked at ("": not run yet)


def skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, raised errors' text."""
    skip: set[int] = set()

    def all_of(node):
        skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                all_of(body[0])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            all_of(node.returns)
        if isinstance(node, ast.arg) and node.annotation:
            all_of(node.annotation)
        if isinstance(node, ast.AnnAssign):
            all_of(node.annotation)
        if isinstance(node, ast.Raise):  # the message's text; the condition that raises is mutated
            skip.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Constant, ast.JoinedStr)))
        if isinstance(node, ast.JoinedStr):  # f-strings are messages and names
            all_of(node)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            all_of(node)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # comment-like strings
            all_of(node)
    return skip


def changes(node: ast.AST) -> list[tuple[int, str]]:
    """(detail, description) of every mutation of this node."""
    if isinstance(node, ast.Compare):
        return [(i, f"{SYMBOL[type(op)]} -> {SYMBOL[COMPARE[type(op)]]}")
                for i, op in enumerate(node.ops) if type(op) in COMPARE]  # fmt: skip
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINARY:
        return [(0, f"{SYMBOL[type(node.op)]} -> {SYMBOL[BINARY[type(node.op)]]}")]
    if isinstance(node, ast.BoolOp):
        return [(0, "and -> or" if isinstance(node.op, ast.And) else "or -> and")]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
        return [(0, f"drop {'not' if isinstance(node.op, ast.Not) else 'unary ' + ('-' if isinstance(node.op, ast.USub) else '~')}")]
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            return [(0, f"{v} -> {not v}")]
        if isinstance(v, (int, float)):
            return [(0, f"{v!r} -> {v + 1!r}")]
        if isinstance(v, str):
            return [(0, f"{v!r} -> {'XX' + v + 'XX'!r}")]
        return []
    if isinstance(node, ast.Return) and node.value is not None:
        if not (isinstance(node.value, ast.Constant) and node.value.value is None):
            return [(0, "return None")]
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return [(0, "call removed")]
    if isinstance(node, ast.Break):
        return [(0, "break -> continue")]
    if isinstance(node, ast.Continue):
        return [(0, "continue -> break")]
    return []


def mutants(module: str, source: str) -> list[Mutant]:
    tree = ast.parse(source)
    skip, lines = skipped_nodes(tree), source.splitlines()
    found = []
    for site, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        for detail, change in changes(node):
            line = getattr(node, "lineno", 0)
            found.append(Mutant(module, site, detail, line, change, lines[line - 1].strip() if line else ""))
    return found


class Mutate(ast.NodeTransformer):
    """Apply one mutant: the node at `site` in ast.walk order of a fresh parse."""

    def __init__(self, target: ast.AST, detail: int):
        self.target, self.detail = target, detail

    def visit(self, node):
        if node is not self.target:
            return self.generic_visit(node)
        if isinstance(node, ast.Compare):
            node.ops[self.detail] = COMPARE[type(node.ops[self.detail])]()
        elif isinstance(node, (ast.BinOp, ast.AugAssign)):
            node.op = BINARY[type(node.op)]()
        elif isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.UnaryOp):
            return node.operand
        elif isinstance(node, ast.Constant):
            v = node.value
            node.value = (not v) if isinstance(v, bool) else v + 1 if isinstance(v, (int, float)) else f"XX{v}XX"
        elif isinstance(node, ast.Return):
            node.value = ast.Constant(None)
        elif isinstance(node, ast.Expr):
            return ast.Pass()
        elif isinstance(node, ast.Break):
            return ast.Continue()
        elif isinstance(node, ast.Continue):
            return ast.Break()
        return node


def mutated_source(source: str, mutant: Mutant | None) -> str:
    tree = ast.parse(source)
    if mutant is not None:
        target = next(n for i, n in enumerate(ast.walk(tree)) if i == mutant.site)
        tree = Mutate(target, mutant.detail).visit(tree)
        ast.fix_missing_locations(tree)
    return ast.unparse(tree) + "\n"


def copy_tree(dest: Path) -> Path:
    """The working tree (without .git, the venv, caches and runs) in `dest`."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".hypothesis", ".pytest_cache", "runs",
                                    "*.egg-info", "results")  # fmt: skip
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def run_tests(work: Path, tests: list[str], env: dict, timeout: float) -> tuple[str, float, str]:
    """(killed | survived | timeout | error, seconds, first failing test) of one pytest process."""
    start = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--tb=no", "-rfE", *tests]
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    seconds = time.monotonic() - start
    failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if done.returncode == 0:
        return "survived", seconds, ""
    if done.returncode == 1:
        return "killed", seconds, failed[0] if failed else ""
    return "error", seconds, (failed[0] if failed else done.stdout.strip().splitlines()[-1:] or [""])[0]


def environment(work: Path, shared: bool, tokenizer: Path | None) -> dict:
    """The tests' environment; `tokenizer`: the shared test tokenizer, when trained (else unset, so a
    test that needs one trains its own rather than reading an empty directory)."""
    env = {**os.environ, "CI": "true", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(work)}  # fmt: skip
    env.pop("HANYEONG_TEST_TOKENIZER", None)
    if tokenizer is not None:
        env["HANYEONG_TEST_TOKENIZER"] = str(tokenizer)
    if not shared:
        env["HANYEONG_SHARED"] = str(work / "no-shared")
    return env


def train_tokenizer_once(work: Path, out: Path) -> None:
    """The tests' shared tokenizer, trained once (tests/conftest.py reuses it via
    HANYEONG_TEST_TOKENIZER) instead of once per test process."""
    code = ("import sys; from pathlib import Path; from tests.conftest import write_small_corpus, train_small_tokenizer; "
            "c = Path(sys.argv[1]); (c / 'corpus').mkdir(); "
            "train_small_tokenizer(write_small_corpus(c / 'corpus'), c / 'tok', c / 'cache')")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=work, check=True,
                   env={**os.environ, "PYTHONPATH": str(work)})  # fmt: skip


STOPPED: list[str] = []  # the module a Ctrl-C or SIGTERM stopped: no module after it starts


def run_module(
    module: str, work: Path, env: dict, deadline: float, log, before: list[dict] | None = None,
    resume: bool = False,
) -> tuple[list[Mutant], float]:
    """Every mutant of `module` in the copy `work` (whose pristine file is the source mutated), and
    the seconds its tests take unmutated. With `before` (the module's recorded mutants: --survivors,
    --resume) each mutant starts from its recorded result, and one recorded as caught is not run
    again: tests only ever gain assertions, so what they caught they still catch. Recorded
    survivors run again, but for those EQUIVALENT judges equivalent (no test can kill them); one
    recorded as not run (a run stopped early) runs only with `resume`.
    A stop (the deadline, Ctrl-C, SIGTERM) falls between mutants: those not reached keep their
    recorded result, the one being run too."""
    target = work / module
    pristine = target.read_text(encoding="utf-8")
    found, tests = mutants(module, pristine), MODULES[module]
    target.write_text(mutated_source(pristine, None), encoding="utf-8")  # unparsed, unmutated
    status, baseline, failed = run_tests(work, tests, env, timeout=1800)
    if status != "survived":
        raise SystemExit(f"{module}: its tests do not pass unmutated ({status} {failed}); fix that first")
    log(f"{module}: {len(found)} mutants; tests pass unmutated in {baseline:.0f} s")
    limit = 3 * baseline + 30
    recorded = {}
    for m in before or []:  # (line, source, change) -> the recorded mutants, in order
        recorded.setdefault((m["line"], m["source"], m["change"]), []).append(m)
    earlier = [(recorded.get((m.line, m.source, m.change)) or [None]).pop(0) for m in found]  # in the same order
    for mutant, kept in zip(found, earlier):
        restore(mutant, kept)
    order = list(range(len(found)))
    random.Random(0).shuffle(order)  # a run stopped early (--minutes, Ctrl-C) has run a random sample
    running = None  # the mutant whose tests are running, and its record
    try:
        for k, i in enumerate(order):
            mutant, kept = found[i], earlier[i]
            if time.monotonic() > deadline:
                break
            if mutant.status in ("killed", "error", "timeout") or (kept and mutant.status == "not run" and not resume):
                continue
            if kept and mutant.equivalent:  # a survivor judged equivalent: no test can kill it
                continue
            target.write_text(mutated_source(pristine, mutant), encoding="utf-8")
            running = mutant, kept
            mutant.status, mutant.seconds, mutant.killer = run_tests(work, tests, env, limit)
            if mutant.status == "timeout":  # a shared machine can be slow a while: once more, longer
                mutant.status, more, mutant.killer = run_tests(work, tests, env, 3 * limit)
                mutant.seconds += more
            if not kept or kept["status"] == "not run":  # its first run, before its survivors were looked at
                mutant.first = mutant.status
            judge(module, mutant)
            running = None
            log(f"  [{k + 1}/{len(found)}] {mutant.status:8} {mutant.seconds:5.1f}s  L{mutant.line} {mutant.change}")
    except KeyboardInterrupt:
        if running is not None:
            restore(*running)
        STOPPED.append(module)
        log(f"{module}: stopped; {sum(m.status != 'not run' for m in found)} of {len(found)} mutants ran")
    finally:
        target.write_text(pristine, encoding="utf-8")
    return found, baseline


def restore(mutant: Mutant, kept: dict | None) -> None:
    """`mutant` as recorded (`kept`, a Mutant's dict), or not run when nothing was."""
    keys = ("status", "seconds", "killer", "first")
    values = [kept.get(k, Mutant.__dataclass_fields__[k].default) for k in keys] if kept else ["not run", 0.0, "", ""]
    for k, v in zip(keys, values):
        setattr(mutant, k, v)
    judge(mutant.module, mutant)


def judge(module: str, mutant: Mutant) -> None:
    """Mark a survivor from EQUIVALENT and NOT_KILLED (and clear both on any other mutant)."""
    key, alive = (module, mutant.source, mutant.change), mutant.status == "survived"
    mutant.equivalent = EQUIVALENT.get(key, "") if alive else ""
    mutant.not_killed = NOT_KILLED.get(key, "") if alive else ""


def summary(found: list[Mutant]) -> dict:
    ran = [m for m in found if m.status != "not run"]
    counts = {s: sum(m.status == s for m in ran) for s in ("killed", "error", "timeout", "survived")}
    equivalent = sum(m.status == "survived" and bool(m.equivalent) for m in ran)
    relevant = len(ran) - equivalent
    caught = counts["killed"] + counts["error"] + counts["timeout"]
    return {"mutants": len(found), "ran": len(ran), **counts, "equivalent": equivalent,
            "kill_rate": round(caught / relevant, 4) if relevant else None}  # fmt: skip


def first_run(found: list[Mutant]) -> dict:
    """What the mutants' first runs found, before their survivors were looked at: the first run of
    the module, and of a stopped run's other mutants when it was resumed."""
    firsts = [m.first for m in found if m.first]
    counts = {s: firsts.count(s) for s in ("killed", "error", "timeout", "survived")}
    return {"ran": len(firsts), **counts, "caught": counts["killed"] + counts["error"] + counts["timeout"]}


def markdown(results: dict) -> str:
    modules = results["modules"]
    runs: dict[tuple[str, str], list[str]] = {}
    for module, entry in modules.items():
        runs.setdefault((entry["date"], entry["command"]), []).append(module)
    lines = ["# Mutation testing", "",
             f"Machine: {results['cpu']}, {results['cores']} cores (`{results['machine']}`). Niced, one test "
             "process at a time. Each module's row is from its latest run:", ""]  # fmt: skip
    for (date, command), names in runs.items():
        minutes = sum(modules[m]["minutes"] for m in names)
        shared = "used" if any(modules[m]["shared"] for m in names) else "absent (those tests skip)"
        lines.append(f"- {date}, `{command}`: {minutes:.0f} minutes; shared data {shared}; "
                     + ", ".join(f"`{Path(m).name}`" for m in names))  # fmt: skip
    lines += ["", "A mutant is killed when the module's own tests fail on it (error: the module no longer imports, "
              "or collection fails), survives when they pass. The kill rate counts timeouts as killed and leaves "
              "out the survivors judged equivalent (listed with the reason). First run: the mutants the module's "
              "tests caught (killed, error or timeout) the first time it was run, before its survivors were "
              "looked at, and that count's share of the mutants not judged equivalent.", "",
              "| module | tests | mutants | killed | error | timeout | survived | equivalent | kill rate | first run |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for module, entry in modules.items():
        s, first = entry["summary"], entry.get("first_run")
        rate = "–" if s["kill_rate"] is None else f"{s['kill_rate']:.1%}"
        # the first runs' share of their mutants not judged equivalent (all of them, for old records)
        judged = [m for m in entry["mutants"] if m.get("first")] or entry["mutants"]
        relevant = first["ran"] - sum(m["status"] == "survived" and bool(m["equivalent"]) for m in judged) if first else 0
        was = f"{first['caught']}/{first['ran']} ({first['caught'] / relevant:.0%})" if relevant else "–"
        tests = ", ".join(t.removeprefix("tests/") for t in entry["tests"])
        lines.append(f"| `{module}` | {tests} | {s['ran']}/{s['mutants']} | {s['killed']} | {s['error']} | "
                     f"{s['timeout']} | {s['survived']} | {s['equivalent']} | {rate} | {was} |")  # fmt: skip
    if results.get("notes"):
        for note in results["notes"]:
            lines += ["", note]
    for module, entry in modules.items():
        survivors = [m for m in entry["mutants"] if m["status"] == "survived"]
        if survivors:
            lines += ["", f"## Survivors in `{module}`", ""]
            for m in sorted(survivors, key=lambda m: (m["line"], m["site"], m["detail"])):
                why = " — **not judged yet**"
                if m["equivalent"]:
                    why = f" — equivalent: {m['equivalent']}"
                elif m.get("not_killed"):
                    why = f" — not equivalent, not killed: {m['not_killed']}"
                lines.append(f"- line {m['line']}: `{m['source']}`: {m['change']}{why}")
    return "\n".join(lines) + "\n"


def read_results(path: Path) -> dict:
    """A results .json, or one error line naming it."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SystemExit(f"{path}: not a mutation results file ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("modules"), dict):
        raise SystemExit(f"{path}: not a mutation results file (no modules)")
    return results


def write_results(path: Path, results: dict) -> None:
    """The .json and its .md, each through a temporary name: a crash leaves the old one whole."""
    from hanyeong.files import write_atomic

    write_atomic(path, json.dumps(results, ensure_ascii=False, indent=1))
    write_atomic(path.with_suffix(".md"), markdown(results))


def merge(path: Path, results: dict) -> dict:
    """`results` over the file at `path`: the modules run now replace theirs, the others are kept.
    A module recorded before mutations.py kept each mutant's first result keeps its recorded
    first_run, plus the mutants that ran now for the first time."""
    if not path.exists():
        return results
    old = read_results(path)
    if old.get("machine") != results["machine"]:
        raise SystemExit(f"{path} holds results of {old.get('machine')}, not {results['machine']}")
    for module, entry in results["modules"].items():
        was = old["modules"].get(module, {})
        if "first_run" in was and not any(m.get("first") for m in was["mutants"]):
            entry["first_run"] = {k: v + entry["first_run"].get(k, 0) for k, v in was["first_run"].items()}
    return {**old, **{k: v for k, v in results.items() if k not in ("modules", "notes")},
            "modules": {**old["modules"], **results["modules"]}}  # fmt: skip


def rejudge(path: Path) -> None:
    """After survivors were looked at: mark them from EQUIVALENT and NOT_KILLED, recount, rewrite
    the .json and .md."""
    results = read_results(path)
    for module, entry in results["modules"].items():
        found = [Mutant(**m) for m in entry["mutants"]]
        for m in found:
            judge(module, m)
        entry["mutants"], entry["summary"] = [asdict(m) for m in found], summary(found)
        if any(m.first for m in found):  # else recorded before each mutant's first result was kept
            entry["first_run"] = first_run(found)
        print(f"{module}: {entry['summary']}")
    write_results(path, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modules", nargs="*", default=DEFAULT, help="paths from MODULES, or 'all'")
    parser.add_argument("--minutes", type=float, default=120, help="stop starting mutants after this")
    parser.add_argument("--shared", action="store_true", help="let tests use ../shared/data")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--survivors", action="store_true",
                        help="run only the mutants the recorded results say survived (and new ones)")
    parser.add_argument("--resume", action="store_true",
                        help="as --survivors, and run the mutants a stopped run did not reach")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--rejudge", type=Path, help="apply EQUIVALENT, NOT_KILLED anew to a results .json, rewrite it"
    )
    args = parser.parse_args()
    if args.rejudge:
        return rejudge(args.rejudge)
    modules = list(MODULES) if args.modules == ["all"] else args.modules
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        raise SystemExit(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    if args.list:
        for module in modules:
            for m in mutants(module, (REPO / module).read_text(encoding="utf-8")):
                print(f"{module}:{m.line}: {m.change}    {m.source}")
        return
    os.nice(19)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops it as Ctrl-C does
    started, deadline = time.monotonic(), time.monotonic() + 60 * args.minutes
    command = "python benchmarks/mutations.py"
    if args.modules != DEFAULT:
        command += f" --modules {' '.join(args.modules)}"
    command += " --survivors" if args.survivors else ""
    command += " --resume" if args.resume else ""
    date = time.strftime("%Y-%m-%d")
    results = {"machine": machine_name(), "cpu": cpu_name(), "cores": os.cpu_count(), "modules": {}}
    with tempfile.TemporaryDirectory(prefix="hanyeong-mutations-") as tmp:
        work = copy_tree(Path(tmp) / "repo")
        tokenizer = None
        if any(t.startswith("tests/tokenizer") for m in modules for t in MODULES[m]):
            tokenizer = Path(tmp) / "tokenizer"
            tokenizer.mkdir()
            train_tokenizer_once(work, tokenizer)
            tokenizer = tokenizer / "tok"
        env = environment(work, args.shared, tokenizer)
        path = (args.out / f"mutations-{results['machine']}").with_suffix(".json")
        recorded = read_results(path)["modules"] if path.exists() else {}
        for module in modules:
            if STOPPED or time.monotonic() > deadline:  # a module not reached keeps its record
                break
            begun = time.monotonic()
            log = lambda s: print(s, flush=True)  # noqa: E731
            before = recorded.get(module, {}).get("mutants") if args.survivors or args.resume else None
            try:
                found, baseline = run_module(module, work, env, deadline, log, before, resume=args.resume)
            except KeyboardInterrupt:  # while its unmutated tests ran: its record stays as it was
                print(f"{module}: stopped before any mutant ran", flush=True)
                break
            if before is None and all(m.status == "not run" for m in found):
                print(f"{module}: stopped before any mutant ran", flush=True)
                break
            counts = summary(found)
            results["modules"][module] = {
                "tests": MODULES[module], "date": date, "command": command, "shared": args.shared,
                "minutes": round((time.monotonic() - begun) / 60, 1), "baseline_seconds": round(baseline, 1),
                "summary": counts, "first_run": first_run(found), "mutants": [asdict(m) for m in found]}  # fmt: skip
            print(f"{module}: {counts}", flush=True)
    print(f"{len(results['modules'])} modules in {(time.monotonic() - started) / 60:.0f} minutes", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = (args.out / f"mutations-{results['machine']}").with_suffix(".json")
    write_results(path, merge(path, results))
    print(f"wrote {path} and its .md (the modules run now replaced, the others kept)")


if __name__ == "__main__":
    main()
