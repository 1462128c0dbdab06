"""The training input pipeline, on grain: documents in, packed, host-sharded batches of token rows out.

Per JAX process, `batch_iterator` builds

    documents: text / JSONL files tokenized on the fly, or pre-tokenized ArrayRecord files
      -> split: the validation files, or a fixed pseudo-random subset of `validation_fraction` of the documents
      -> this process's share: documents[process_index::process_count] (disjoint, together all of them)
      -> seeded shuffle (a different order every epoch), repeated for `num_epochs` (None: forever)
      -> tokenize in `read_threads` threads, append EOS
      -> pack: documents are concatenated and cut into rows of seq_len (grain's ConcatThenSplit), so a long
         document continues on the next row and only the stream's very last row is padded
      -> optionally, packed rows shuffled within windows of `shuffle_rows` (a long file fills many rows)
      -> rows stacked into batches of B_local = global_batch_size / process_count, prefetched by a thread
    -> {"input_ids": int32 [B_local, T], "segment_ids": int32 [B_local, T]}

segment_ids number the documents of a row 1, 2, 3, ... and restart at 1 on every row; 0 marks padding (whose
input_ids are 0). This is the model's convention: positions restart at each run of equal ids, attention stays
inside it, and `next_token_labels` gives the loss its targets without crossing a document boundary.

Pre-tokenized format: ArrayRecord, the format MaxText's grain pipeline reads. grain ships its reader
(`grain.sources.ArrayRecordDataSource`) and the `array_record` package is already installed with grain, so
nothing new is needed. It gives random access by record number, which grain's index shuffle and per-host
slicing rely on (a host reads only its own documents, in shuffled order, without scanning the rest). One
record is one document: its token ids as little-endian int32 bytes, without EOS (the pipeline appends
`eos_id` to every document, whatever its format). MaxText stores tf.train.Example protos instead; raw bytes
keep TensorFlow out. Files are written with `group_size:1`, so reading a record decodes only that record.
`write_arrayrecord` / `convert_to_arrayrecord` (also `python -m glmjax.train.data convert ...`) write it.

Resume: `BatchIterator.get_state()` is a small JSON-serialisable dict (positions, not data); `set_state` on a
fresh iterator built from the same config and process layout continues with the same batches bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import jax
import jax.numpy as jnp
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, ThreadPrefetchIterDataset, WindowShuffleIterDataset
from tokenizers import Tokenizer

from glmjax.errors import ConfigError, GlmjaxError
from glmjax.files import regular_file
from glmjax.train.sections import from_mapping

Format = Literal["auto", "text", "jsonl", "arrayrecord"]
FORMATS = ("auto", "text", "jsonl", "arrayrecord")
ARRAYRECORD_SUFFIXES = (".arrayrecord", ".array_record")
TOKEN_DTYPE = np.dtype("<i4")  # one ArrayRecord record = a document's token ids in this dtype
STATE_VERSION = 1
# The validation subset must not move when the training seed changes, so it has its own fixed seed.
_SPLIT_SEED = 0x5EED5EED
# Documents tokenized ahead of the packer (grain's ReadOptions buffer); small, as documents can be long.
_READ_BUFFER = 64


class DataError(GlmjaxError):
    """A data file that cannot be read as configured; the message names the file (and line)."""


# ------------------------------------------------------------------ config


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline reads and how it batches it. Paths may be glob patterns (sorted, `**` recursive).

    format "auto" takes each file's format from its name: *.jsonl is JSONL, *.arrayrecord / *.array_record
    pre-tokenized, anything else a text file (one document per file). global_batch_size is rows per step over
    all processes; each process yields global_batch_size / process_count of them."""

    train_files: tuple[str, ...]
    seq_len: int
    global_batch_size: int
    format: Format = "auto"
    tokenizer: str | None = None  # tokenizer.json, needed by text and JSONL sources
    jsonl_field: str = "text"
    eos_id: int | None = None  # appended to every document when set
    shuffle: bool = True
    seed: int = 0  # shuffle seed, 0 <= seed < 2**32 (grain's index shuffle)
    # Packed rows shuffled within windows of this many (0: off). A text file is one document, and a long one
    # fills many consecutive rows: without it, whole batches come from one file.
    shuffle_rows: int = 0
    validation_files: tuple[str, ...] = ()
    validation_fraction: float = 0.0  # of the train_files documents held out (when no validation_files)
    num_epochs: int | None = None  # training passes over the data; None repeats forever
    prefetch: int = 2  # batches a background thread keeps ready; 0 = none
    read_threads: int = 2  # threads reading and tokenizing documents; 0 = in the packing thread

    def __post_init__(self):
        def err(name: str, msg: str) -> ConfigError:
            return ConfigError(f"DataConfig.{name}: {msg}")

        for name in ("train_files", "validation_files"):
            v = getattr(self, name)
            if not isinstance(v, list | tuple) or not all(isinstance(p, str) and p for p in v):
                raise err(name, f"expected a list of file paths or glob patterns, got {v!r}")
            object.__setattr__(self, name, tuple(v))  # a list from JSON becomes the hashable tuple
        if not self.train_files:
            raise err("train_files", "is empty")
        ints = {"seq_len": 2, "global_batch_size": 1, "prefetch": 0, "read_threads": 0, "seed": 0,
                "eos_id": 0, "num_epochs": 1, "shuffle_rows": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if v is None and name in ("eos_id", "num_epochs"):
                continue
            if not _is_int(v) or v < low:
                raise err(name, f"expected an integer >= {low}, got {v!r}")
        if self.seed >= 2**32:
            raise err("seed", f"must be < 2**32, got {self.seed}")
        if self.format not in FORMATS:
            raise err("format", f"expected one of {FORMATS}, got {self.format!r}")
        if self.tokenizer is not None and not (isinstance(self.tokenizer, str) and self.tokenizer):
            raise err("tokenizer", f"expected a path to tokenizer.json, got {self.tokenizer!r}")
        if not (isinstance(self.jsonl_field, str) and self.jsonl_field):
            raise err("jsonl_field", f"expected a non-empty string, got {self.jsonl_field!r}")
        if not isinstance(self.shuffle, bool):
            raise err("shuffle", f"expected true or false, got {self.shuffle!r}")
        f = self.validation_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f < 1.0:
            raise err("validation_fraction", f"expected a number in [0, 1), got {f!r}")
        if f > 0 and self.validation_files:
            raise err("validation_fraction", "set together with validation_files; choose one")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
        """From a config file's mapping; an unknown or missing field is an error naming it."""
        return from_mapping(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def has_validation(self) -> bool:
        return bool(self.validation_files) or self.validation_fraction > 0


def expand_files(patterns: Sequence[str], field: str) -> list[Path]:
    """Glob patterns and plain paths -> regular files, in the given order, each pattern's matches sorted."""
    out: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"DataConfig.{field}: {pattern!r} matches no file")
            out.extend(matches)
        else:
            try:
                out.append(regular_file(pattern, ConfigError))
            except ConfigError as e:
                raise ConfigError(f"DataConfig.{field}: {e}") from None
    return out


def file_format(path: Path, fmt: Format) -> str:
    """"text", "jsonl" or "arrayrecord" for one file under DataConfig.format `fmt`."""
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    return "arrayrecord" if name.endswith(ARRAYRECORD_SUFFIXES) else "text"


# ------------------------------------------------------------------ document sources


def _jsonl_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, stop, line_number) int64 [n] of the non-empty lines of a file, newline excluded: found by
    scanning for b"\\n" in 16 MiB blocks, so an index over a large file is built without parsing it."""
    newlines, size, chunk = [], 0, 1 << 24
    with open(path, "rb") as f:
        while block := f.read(chunk):
            newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + size)
            size += len(block)
    ends = np.concatenate(newlines + [np.zeros(0, np.int64)]).astype(np.int64)
    if size and (not len(ends) or ends[-1] != size - 1):
        ends = np.append(ends, size)  # a last line without a newline
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = ends > starts
    return starts[keep], ends[keep], np.flatnonzero(keep).astype(np.int64) + 1


class TextDocuments:
    """Random access to the documents of text and JSONL files: a text file is one document, a non-empty
    JSONL line one (its `field`). `docs[i]` -> str. Only byte offsets are kept in memory (24 bytes per
    document); a document is read from disk when asked for, so each host reads only its own share."""

    def __init__(self, files: Sequence[tuple[Path, str]], field: str = "text"):
        self.paths = [p for p, _ in files]
        self.field = field
        self._jsonl = np.array([kind == "jsonl" for _, kind in files], bool)
        parts = []
        for i, (path, kind) in enumerate(files):
            if kind == "jsonl":
                start, stop, line = _jsonl_lines(path)
            else:
                start, stop, line = np.zeros(1, np.int64), np.array([path.stat().st_size]), np.zeros(1, np.int64)
            parts.append((np.full(len(start), i, np.int32), start, stop, line))
        self._file, self._start, self._stop, self._line = (np.concatenate(a) for a in zip(*parts, strict=True))

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, index: int) -> str:
        i = int(self._file[index])
        path, start, stop = self.paths[i], int(self._start[index]), int(self._stop[index])
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
        if not self._jsonl[i]:
            return data.decode("utf-8", errors="replace")  # one odd byte should not stop a long run
        where = f"{path}: line {int(self._line[index])}"
        if not data.strip():
            return ""
        try:
            record = json.loads(data)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg})") from None
        text = record.get(self.field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where}: no string field {self.field!r}")
        return text


def _decode_record(record: bytes) -> np.ndarray:
    """One ArrayRecord record -> int32 [n] token ids."""
    return np.frombuffer(record, TOKEN_DTYPE).astype(np.int32)


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """str -> int32 [n]. No special tokens: the pipeline's only addition is `eos_id`."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def _finish(tokens: np.ndarray, eos_id: int | None) -> dict[str, np.ndarray] | None:
    """Appends EOS; an empty document becomes None, which grain drops (a zero-length segment is no use)."""
    if eos_id is not None:
        tokens = np.append(tokens, np.int32(eos_id))
    return {"input_ids": tokens} if len(tokens) else None


def documents(files: Sequence[Path], config: DataConfig, tokenizer: Tokenizer | None) -> grain.MapDataset:
    """All documents of `files`, in file order: a MapDataset of {"input_ids": int32 [n]} (None for an empty
    one). Text and JSONL files are tokenized when a document is read."""
    kinds = [(p, file_format(p, config.format)) for p in files]
    parts = []
    text = [(p, k) for p, k in kinds if k != "arrayrecord"]
    if text:
        if tokenizer is None:
            raise ConfigError(f"DataConfig.tokenizer: needed to tokenize {text[0][0]} (a {text[0][1]} file)")
        parts.append(grain.MapDataset.source(TextDocuments(text, config.jsonl_field))
                     .map(functools.partial(_encode, tokenizer)))
    records = [str(p) for p, k in kinds if k == "arrayrecord"]
    if records:
        parts.append(grain.MapDataset.source(grain.sources.ArrayRecordDataSource(records)).map(_decode_record))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    return ds.map(functools.partial(_finish, eos_id=config.eos_id))


# ------------------------------------------------------------------ batches


def _stack(rows: Sequence[Mapping[str, np.ndarray]], batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Packed rows -> the step's arrays; a short last batch (finite passes only) gets padding rows."""
    ids = np.zeros((batch, seq_len), np.int32)
    seg = np.zeros((batch, seq_len), np.int32)
    for i, row in enumerate(rows):
        ids[i] = row["input_ids"]
        seg[i] = row["input_ids_segment_ids"]
    return {"input_ids": ids, "segment_ids": seg}


def _to_json(state: Any) -> Any:
    return json.loads(json.dumps(state))


def _from_json(state: Any) -> Any:
    """Undoes JSON's one loss: grain's packer compares its slices with tuples, and JSON made them lists."""
    if isinstance(state, dict):
        return {k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _from_json(v)
                for k, v in state.items()}
    return state


class BatchIterator:
    """Host-local batches {"input_ids", "segment_ids"}: int32 [batch_size, seq_len] each, forever or for
    `num_epochs`. get_state()/set_state() save and restore the position exactly (JSON-serialisable)."""

    def __init__(self, dataset: grain.IterDataset, *, batch_size: int, seq_len: int, fingerprint: str):
        self.batch_size, self.seq_len, self.fingerprint = batch_size, seq_len, fingerprint
        self._it = iter(dataset)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._open())

    def _open(self) -> grain.DatasetIterator:
        if self._it is None:
            raise ValueError("BatchIterator: used after close()")
        return self._it

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "grain": _to_json(self._open().get_state())}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from `state` (from get_state of an iterator over the same data, split and hosts)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state: not a version {STATE_VERSION} state")
        if state.get("fingerprint") != self.fingerprint:
            raise DataError("data iterator state: saved for other data, split, seed, seq_len or process layout "
                            "(fingerprints differ)")
        self._open().set_state(_from_json(state["grain"]))

    def close(self) -> None:
        """Stops the prefetch thread. The grain iterator is released here too: one still alive at interpreter
        exit is closed again by its __del__ after the modules it needs are gone, which prints a traceback."""
        if self._it is not None:
            it, self._it = self._it, None
            it.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fingerprint(config: DataConfig, split: str, files: Sequence[Path], process_index: int, process_count: int,
                 num_epochs: int | None) -> str:
    """What fixes the sequence of rows: a state restored under anything else would silently read other data.
    Files count by name and size, not by path, so a run can resume with its data mounted elsewhere. The batch
    size is left out (the state counts rows, so a new batch size resumes correctly), as are the prefetch and
    thread counts and the tokenizer's path."""
    skip = ("train_files", "validation_files", "tokenizer", "global_batch_size", "prefetch", "read_threads",
            "num_epochs")
    keep = {k: v for k, v in config.to_dict().items() if k not in skip}
    key = {"config": keep, "split": split, "process": [process_index, process_count], "epochs": num_epochs,
           "files": [[p.name, p.stat().st_size] for p in files]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


_TRAIN_EPOCHS = object()


def batch_iterator(config: DataConfig, split: Literal["train", "validation"] = "train", *,
                   tokenizer: Tokenizer | None = None, process_index: int | None = None,
                   process_count: int | None = None, num_epochs: int | None | object = _TRAIN_EPOCHS
                   ) -> BatchIterator:
    """This process's batches of `split`: {"input_ids", "segment_ids"} int32 [global_batch_size /
    process_count, seq_len].

    tokenizer: overrides loading `config.tokenizer`. process_index / process_count: default
    jax.process_index() / jax.process_count(), which start JAX's backend: on several hosts, call this after
    jax.distributed.initialize(). num_epochs: default config.num_epochs for "train" and 1 for
    "validation"; a finite pass ends with StopIteration, its last batch padded with segment_ids 0. Hosts can
    get different numbers of batches from a finite pass, so a multi-host evaluation should rather take a
    fixed number of batches from num_epochs=None."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not (0 <= pi < pc):
        raise ConfigError(f"process_index {pi} not in [0, process_count {pc})")
    if config.global_batch_size % pc:
        raise ConfigError(f"DataConfig.global_batch_size: {config.global_batch_size} is not divisible by the "
                          f"{pc} processes")
    if split not in ("train", "validation"):
        raise ConfigError(f"split: expected 'train' or 'validation', got {split!r}")
    if split == "validation" and not config.has_validation():
        raise ConfigError("DataConfig.validation_fraction: 0 and no validation_files, so there is no validation "
                          "split")
    if num_epochs is _TRAIN_EPOCHS:
        num_epochs = config.num_epochs if split == "train" else 1

    use_files = split == "validation" and config.validation_files
    names = ("validation_files", config.validation_files) if use_files else ("train_files", config.train_files)
    files = expand_files(names[1], names[0])
    if tokenizer is None and config.tokenizer and any(file_format(p, config.format) != "arrayrecord" for p in files):
        tokenizer = Tokenizer.from_file(str(regular_file(config.tokenizer, ConfigError)))
    docs = documents(files, config, tokenizer)
    if config.validation_fraction > 0:
        n_val = max(1, round(len(docs) * config.validation_fraction))
        if n_val >= len(docs):
            raise ConfigError(f"DataConfig.validation_fraction: {config.validation_fraction} of {len(docs)} "
                              "documents leaves none to train on")
        mixed = docs.shuffle(_SPLIT_SEED)  # a lazy index permutation: no list of documents is built
        docs = mixed[:n_val] if split == "validation" else mixed[n_val:]
    if len(docs) < pc:
        raise DataError(f"{names[0]}: {len(docs)} documents for {split} cannot be shared by {pc} processes")

    docs = docs[pi::pc]
    if config.shuffle:
        docs = docs.shuffle(config.seed)  # grain folds the epoch into the seed: every epoch a new order
    docs = docs.repeat(num_epochs)
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=_READ_BUFFER)
    rows = ConcatThenSplitIterDataset(docs.to_iter_dataset(read), length_struct={"input_ids": config.seq_len})
    if config.shuffle and config.shuffle_rows > 1:
        rows = WindowShuffleIterDataset(rows, window_size=config.shuffle_rows, seed=config.seed)
    local = config.global_batch_size // pc
    ds = rows.batch(local, batch_fn=functools.partial(_stack, batch=local, seq_len=config.seq_len))
    if config.prefetch:
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch)
    return BatchIterator(ds, batch_size=local, seq_len=config.seq_len,
                         fingerprint=_fingerprint(config, split, files, pi, pc, num_epochs))


def next_token_labels(input_ids: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """input_ids, segment_ids int32 [B, T] -> (labels int32 [B, T], weights float32 [B, T]).

    labels[:, t] = input_ids[:, t + 1] where token t + 1 belongs to the same document as token t (weight 1);
    elsewhere (the last token of a document or of a row, padding) label 0 and weight 0. A document cut at a
    row's end loses that one target: its continuation on the next row starts a new segment. Works under jit."""
    B = input_ids.shape[0]
    nxt = jnp.concatenate([input_ids[:, 1:], jnp.zeros((B, 1), input_ids.dtype)], axis=1)
    same = jnp.concatenate([(segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0),
                            jnp.zeros((B, 1), bool)], axis=1)
    return jnp.where(same, nxt, 0).astype(jnp.int32), same.astype(jnp.float32)


# ------------------------------------------------------------------ writing the pre-tokenized format


def write_arrayrecord(path: str | Path, docs: Iterable[Sequence[int] | np.ndarray]) -> int:
    """Writes one record per document (int32 token ids, little-endian) to `path`; returns the count. The
    file appears complete or not at all: it is written beside the target and renamed."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    n = 0
    try:
        for doc in docs:
            tokens = np.asarray(doc)
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise DataError(f"{path}: document {n} is not a 1-D integer array ({tokens.dtype}, {tokens.shape})")
            writer.write(tokens.astype(TOKEN_DTYPE).tobytes())
            n += 1
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)
    return n


def convert_to_arrayrecord(files: Sequence[str | Path], output: str | Path, tokenizer: Tokenizer, *,
                           format: Format = "auto", jsonl_field: str = "text", batch: int = 256) -> tuple[int, int]:
    """Tokenizes the documents of text / JSONL `files` (same rules as the pipeline) into one ArrayRecord
    file; returns (documents, tokens). Batches go through tokenizer.encode_batch, which runs in parallel."""
    paths = [Path(p) for p in files]
    kinds = [(p, file_format(p, format)) for p in paths]
    bad = [p for p, k in kinds if k == "arrayrecord"]
    if bad:
        raise ConfigError(f"files: {bad[0]} is already pre-tokenized")
    source = TextDocuments(kinds, jsonl_field)
    tokens = 0

    def docs():
        nonlocal tokens
        for lo in range(0, len(source), batch):
            texts = [source[i] for i in range(lo, min(lo + batch, len(source)))]
            for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
                tokens += len(enc.ids)
                yield np.asarray(enc.ids, np.int32)

    return write_arrayrecord(output, docs()), tokens


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glmjax.train.data")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="tokenize text / JSONL files into a pre-tokenized ArrayRecord file")
    c.add_argument("files", nargs="+")
    c.add_argument("--tokenizer", required=True, help="tokenizer.json")
    c.add_argument("--output", required=True, help="e.g. train.arrayrecord")
    c.add_argument("--format", default="auto", choices=FORMATS[:3])
    c.add_argument("--jsonl-field", default="text")
    args = p.parse_args(argv)
    try:
        files = expand_files(args.files, "files")
        tok = Tokenizer.from_file(str(regular_file(args.tokenizer, ConfigError)))
        t0 = time.perf_counter()
        n, tokens = convert_to_arrayrecord(files, args.output, tok, format=args.format, jsonl_field=args.jsonl_field)
    except GlmjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"{args.output}: {n} documents, {tokens} tokens in {dt:.1f} s ({tokens / max(dt, 1e-9):,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
