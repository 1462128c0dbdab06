"""The demo's tokenizer: byte-level BPE trained with `tokenizers` on the Python standard library's sources.

The corpus is every `.py` file under `sysconfig.get_paths()["stdlib"]` outside test directories and
site-packages, in sorted order (about 11 MB on CPython 3.13). Files are held out whole for validation: a file
is a validation file when a hash of its path relative to the corpus root (and the seed) falls under the
fraction, so the split does not depend on the machine, on the order of files, or on which other files exist.

Byte-level BPE maps every byte to a symbol first, so any text (any indentation, any Unicode) encodes and
decodes back exactly, with no unknown token. The special tokens come first in the vocabulary: PAD = 0 (the
pipeline's padding id) and EOS = 1 (set DataConfig.eos_id to it).

    python -m glmjax.train.tokenizer OUT_DIR [--vocab-size 4096] [--validation-fraction 0.05]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD = "<|pad|>"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, EOS)
# Directories of the stdlib that are not library code (tests, the IDLE test suite) or not the stdlib at all.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                           "encodings"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The demo corpus: the .py files under `root` (default: this Python's stdlib), sorted, skipping
    EXCLUDED_DIRS."""
    root = stdlib_root() if root is None else Path(root)
    files = (p for p in root.rglob("*.py") if p.is_file())
    return sorted(p for p in files if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))


def split_files(files: Sequence[Path], root: Path, validation_fraction: float, *, seed: int = 0
                ) -> tuple[list[Path], list[Path]]:
    """(train, validation) by whole file; each keeps the order of `files`."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: expected a number in [0, 1), got {validation_fraction!r}")

    def held_out(p: Path) -> bool:
        digest = hashlib.sha256(f"{seed}:{p.relative_to(root).as_posix()}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction

    train, val = [], []
    for p in files:
        (val if held_out(p) else train).append(p)
    return train, val


def _texts(files: Sequence[Path]) -> Iterator[str]:
    # Whole files, as the pipeline reads them (a text file is one document), so the merges are learned on the
    # same whitespace runs across line ends that encoding will see.
    for p in files:
        yield p.read_text("utf-8", errors="replace")


def train_bpe(files: Sequence[Path], vocab_size: int, *, special_tokens: Sequence[str] = SPECIAL_TOKENS,
              min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer of `vocab_size` entries (special tokens first, then the 256 bytes, then
    merges) trained on the text of `files`."""
    if vocab_size < len(special_tokens) + 256:
        raise ValueError(f"vocab_size: {vocab_size} leaves no room for the 256 bytes and the special tokens")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would be added to every document and break the round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(files), trainer=trainer, length=len(files))
    return tok


def corpus_digest(files: Sequence[Path], root: Path) -> str:
    """sha256 over the training files' paths (relative to the corpus root) and contents: names the corpus a
    tokenizer was trained on, whatever machine or Python it came from."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


MANIFEST = "tokenizer.corpus.json"  # beside tokenizer.json: what it was trained on


@dataclasses.dataclass(frozen=True)
class DemoTokenizer:
    """What `build_demo_tokenizer` made: the saved tokenizer, the corpus split, the special ids, the time."""

    path: Path  # tokenizer.json
    train_files: tuple[Path, ...]
    validation_files: tuple[Path, ...]
    pad_id: int
    eos_id: int
    seconds: float  # training time


def build_demo_tokenizer(out_dir: str | Path, vocab_size: int = 4096, *, validation_fraction: float = 0.05,
                         seed: int = 0, root: Path | None = None) -> DemoTokenizer:
    """Trains on the training files of the stdlib corpus (the validation files stay unseen) and saves
    OUT_DIR/tokenizer.json, with OUT_DIR/tokenizer.corpus.json recording the vocabulary size, the split and a
    digest of the training files. A tokenizer already there is reused (seconds 0) when its record matches, so
    a resumed run keeps the token ids its checkpoints were trained on; one from another corpus, split or
    vocabulary size (or with no record) is an error (ValueError)."""
    root = stdlib_root() if root is None else Path(root)
    train, val = split_files(stdlib_sources(root), root, validation_fraction, seed=seed)
    if not train:
        raise ValueError(f"no Python sources under {root}")
    out = Path(out_dir)
    saved, manifest_path = out / "tokenizer.json", out / MANIFEST
    manifest = {"vocab_size": vocab_size, "validation_fraction": validation_fraction, "seed": seed,
                "train_files": len(train), "corpus_sha256": corpus_digest(train, root)}
    if saved.exists():
        # A resumed run must keep the token ids its checkpoints were trained on, so the tokenizer there is
        # reused only if it was trained on this very corpus and split; anything else is refused, not retrained.
        found = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if found != manifest:
            why = ("has no record of its corpus" if found is None else
                   "was trained on another corpus or split: " + ", ".join(
                       f"{k} {found.get(k)!r} there, {v!r} here" for k, v in manifest.items() if found.get(k) != v))
            raise ValueError(f"{saved} {why}. Its ids would not match this corpus; choose another output "
                             "directory, or delete it (and the checkpoints trained with it) to start over")
        tok = Tokenizer.from_file(str(saved))
        return DemoTokenizer(saved, tuple(train), tuple(val), tok.token_to_id(PAD), tok.token_to_id(EOS), 0.0)
    t0 = time.perf_counter()
    tok = train_bpe(train, vocab_size)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")  # first: a crash between leaves no orphan
    tok.save(str(saved))
    return DemoTokenizer(saved, tuple(train), tuple(val), tok.token_to_id(PAD), tok.token_to_id(EOS), seconds)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glmjax.train.tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--validation-fraction", type=float, default=0.05)
    args = p.parse_args(argv)
    demo = build_demo_tokenizer(args.out_dir, args.vocab_size, validation_fraction=args.validation_fraction)
    mb = sum(f.stat().st_size for f in demo.train_files) / 1e6
    print(f"{demo.path}: vocab {args.vocab_size}, trained on {len(demo.train_files)} files ({mb:.1f} MB) in "
          f"{demo.seconds:.1f} s; {len(demo.validation_files)} files held out; pad {demo.pad_id}, eos {demo.eos_id}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
