"""Block sizes of every kernel: one typed, frozen dataclass per op and kernel family, read from tuned_blocks.json.

The kernels take these objects (`blocks=`) and hold no numeric block-size defaults of their own, so the JSON
file is the one place a tile size lives. Layout of the file:

    {"<op>": {"<family>": {"default": {<field>: <int>, ...}, "<jax device_kind>": {...}}}}

An entry for the exact device kind wins over the family's "default". Every entry must name exactly the fields
of its dataclass, each a positive int; the whole file is checked when first read, and an error names the op,
the family, the entry and the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import ClassVar

import jax

TUNED_BLOCKS_PATH = Path(__file__).parent / "tuned_blocks.json"


class BlockConfigError(ValueError):
    """A block-size entry is malformed: unknown or missing op, family or field, or a non-positive value."""


def _check_value(where: str, name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise BlockConfigError(f"{where}: field {name!r} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class _Blocks:
    op: ClassVar[str]
    family: ClassVar[str]

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_value(f"{self.op}/{self.family}", f.name, getattr(self, f.name))

    @classmethod
    def from_dict(cls, entry: dict, where: str):
        """Builds the config from one JSON entry; `where` names it in errors (op/family/entry)."""
        if not isinstance(entry, dict):
            raise BlockConfigError(f"{where}: expected an object of fields, got {entry!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(entry) - set(names))
        missing = [n for n in names if n not in entry]
        if unknown:
            raise BlockConfigError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {names}")
        if missing:
            raise BlockConfigError(f"{where}: missing field(s) {missing}")
        for n in names:
            _check_value(where, n, entry[n])
        return cls(**entry)


@dataclasses.dataclass(frozen=True)
class IndexerScoresTpuBlocks(_Blocks):
    """block_q queries x block_k keys per grid step."""

    op: ClassVar[str] = "indexer_scores"
    family: ClassVar[str] = "tpu"
    block_q: int
    block_k: int


@dataclasses.dataclass(frozen=True)
class IndexerScoresGpuBlocks(_Blocks):
    """block_rows query rows (queries x heads) and block_k keys per program; Triton launch parameters."""

    op: ClassVar[str] = "indexer_scores"
    family: ClassVar[str] = "gpu"
    block_rows: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class KthLargestKeyTpuBlocks(_Blocks):
    """block_rows full score rows held in VMEM per grid step."""

    op: ClassVar[str] = "kth_largest_key"
    family: ClassVar[str] = "tpu"
    block_rows: int


@dataclasses.dataclass(frozen=True)
class SparseMlaFwdTpuBlocks(_Blocks):
    """k_block selected rows per token per grid step; rows_per_step = tokens per step x k_block."""

    op: ClassVar[str] = "sparse_mla_fwd"
    family: ClassVar[str] = "tpu"
    k_block: int
    rows_per_step: int


@dataclasses.dataclass(frozen=True)
class SparseMlaBwdTpuBlocks(_Blocks):
    """As the forward; the backward's float32 row-gradient block makes its rows_per_step the smaller one."""

    op: ClassVar[str] = "sparse_mla_bwd"
    family: ClassVar[str] = "tpu"
    k_block: int
    rows_per_step: int


@dataclasses.dataclass(frozen=True)
class SparseMlaFwdGpuBlocks(_Blocks):
    """block_k rows x block_h heads per loop step of a program; split-K aims at target_programs programs (one
    per SM); Triton launch parameters."""

    op: ClassVar[str] = "sparse_mla_fwd"
    family: ClassVar[str] = "gpu"
    block_k: int
    block_h: int
    target_programs: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class SparseMlaBwdGpuBlocks(_Blocks):
    """block_k rows x block_h heads per loop step of a program; Triton launch parameters."""

    op: ClassVar[str] = "sparse_mla_bwd"
    family: ClassVar[str] = "gpu"
    block_k: int
    block_h: int
    num_warps: int
    num_stages: int


BLOCK_CONFIGS: dict[tuple[str, str], type[_Blocks]] = {
    (c.op, c.family): c
    for c in (IndexerScoresTpuBlocks, IndexerScoresGpuBlocks, KthLargestKeyTpuBlocks, SparseMlaFwdTpuBlocks,
              SparseMlaBwdTpuBlocks, SparseMlaFwdGpuBlocks, SparseMlaBwdGpuBlocks)
}


def load_block_table(path: Path | str = TUNED_BLOCKS_PATH) -> dict[tuple[str, str], dict[str, _Blocks]]:
    """Reads and validates a tuned-blocks file: {(op, family): {entry name ("default" or a device kind): config}}.

    Raises BlockConfigError on an unknown or missing op / family, an entry without "default", or a bad entry."""
    raw = json.loads(Path(path).read_text())
    ops = {op for op, _ in BLOCK_CONFIGS}
    unknown = sorted(set(raw) - ops - {"_about"})
    if unknown:
        raise BlockConfigError(f"{path}: unknown op(s) {unknown}; known: {sorted(ops)}")
    table = {}
    for (op, family), cls in BLOCK_CONFIGS.items():
        if op not in raw:
            raise BlockConfigError(f"{path}: missing op {op!r}")
        families = {f for o, f in BLOCK_CONFIGS if o == op}
        extra = sorted(set(raw[op]) - families)
        if extra:
            raise BlockConfigError(f"{path}: {op}: unknown kernel family {extra}; known: {sorted(families)}")
        if family not in raw[op]:
            raise BlockConfigError(f"{path}: {op}: missing kernel family {family!r}")
        entries = raw[op][family]
        if "default" not in entries:
            raise BlockConfigError(f"{path}: {op}/{family}: missing the 'default' entry")
        table[(op, family)] = {name: cls.from_dict(e, f"{op}/{family}/{name}") for name, e in entries.items()}
    return table


@functools.cache
def _table():
    return load_block_table()


def tuned_blocks(op: str, family: str, device_kind: str | None = None) -> _Blocks:
    """The block config of `op` for kernel `family`: the entry for `device_kind` if the file has one, else the
    family's default. device_kind defaults to the default device's kind when that device is of `family` (an
    ahead-of-time compile for a TPU from a CPU host gets the family default unless the kind is given)."""
    if (op, family) not in BLOCK_CONFIGS:
        raise BlockConfigError(f"no block config for op {op!r} on kernel family {family!r}; known: "
                               f"{sorted(BLOCK_CONFIGS)}")
    entries = _table()[(op, family)]
    if device_kind is None and jax.default_backend() == family:
        device_kind = jax.devices()[0].device_kind
    return entries.get(device_kind, entries["default"])
