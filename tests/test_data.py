"""The input pipeline (glmjax/train/data.py) and the demo tokenizer (glmjax/train/tokenizer.py)."""

import json
from pathlib import Path

import grain
import numpy as np
import pytest

from glmjax.errors import ConfigError
from glmjax.train import tokenizer as tokmod
from glmjax.train.data import (
    DataConfig,
    DataError,
    _decode_record,
    batch_iterator,
    convert_to_arrayrecord,
    next_token_labels,
    write_arrayrecord,
)

EOS = 999_999


def make_docs(n: int, seed: int = 0, max_len: int = 40) -> list[np.ndarray]:
    """Documents whose every token names its document and position (doc * 1000 + i): any loss, duplicate or
    reordering shows. Lengths 1..max_len, so with seq_len 16 many documents span rows."""
    rng = np.random.default_rng(seed)
    return [np.arange(int(rng.integers(1, max_len + 1)), dtype=np.int32) + 1000 * (d + 1) for d in range(n)]


@pytest.fixture
def records(tmp_path):
    docs = make_docs(60)
    path = tmp_path / "docs.arrayrecord"
    assert write_arrayrecord(path, docs) == len(docs)
    return path, docs


def config(path, **kw) -> DataConfig:
    base = dict(train_files=(str(path),), seq_len=16, global_batch_size=4, eos_id=EOS, prefetch=0, read_threads=0)
    return DataConfig(**{**base, **kw})


def take(it, n=None) -> list[dict[str, np.ndarray]]:
    return list(it) if n is None else [next(it) for _ in range(n)]


def rows_of(batches) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([b["input_ids"] for b in batches]), np.concatenate([b["segment_ids"] for b in batches]))


def check_rows(ids: np.ndarray, seg: np.ndarray) -> None:
    """Segment ids restart at 1 on every row and count up by one per document; padding only at a row's end;
    each segment holds the pieces of one document (plus its EOS)."""
    for r in range(len(ids)):
        s = seg[r]
        real = s != 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), f"row {r}: padding inside the row"
        assert (ids[r][~real] == 0).all()
        if n:
            assert s[0] == 1 and set(np.diff(s[:n])) <= {0, 1}, f"row {r}: segment ids {s}"
            for k in np.unique(s[:n]):
                toks = ids[r][s == k]
                assert len(set((toks[toks != EOS]) // 1000)) <= 1, f"row {r}: segment {k} mixes documents"
                assert (toks == EOS).sum() <= 1 and (toks[-1] == EOS or (toks == EOS).sum() == 0)


def stream(ids: np.ndarray, seg: np.ndarray) -> np.ndarray:
    return ids[seg != 0]


def split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == EOS)
    assert ends[-1] == len(tokens) - 1
    return [piece[:-1] for piece in np.split(tokens, ends[:-1] + 1)]  # each without its EOS


# ------------------------------------------------------------------ packing


def test_packing_in_order_every_token_once(records):
    path, docs = records
    with batch_iterator(config(path, shuffle=False, num_epochs=1), process_index=0, process_count=1) as it:
        batches = take(it)
    ids, seg = rows_of(batches)
    assert ids.shape[1] == 16 and ids.dtype == np.int32 and seg.dtype == np.int32
    check_rows(ids, seg)
    expected = np.concatenate([np.append(d, EOS) for d in docs])
    np.testing.assert_array_equal(stream(ids, seg), expected)
    # The stream is cut without gaps, so only the very last row may be padded; a short last batch gets
    # whole padding rows.
    assert (seg[:-1] != 0).sum() + (seg[-1] != 0).sum() == len(expected)
    assert all((s != 0).all() for s in seg[: len(expected) // 16])
    assert len(ids) == 4 * -(-len(expected) // 64) and (seg[-1] == 0).any()


def test_shuffle_is_seeded_permutation_and_reshuffles_each_epoch(records):
    path, docs = records
    def epoch_docs(seed, epochs):
        with batch_iterator(config(path, seed=seed, num_epochs=epochs), process_index=0, process_count=1) as it:
            ids, seg = rows_of(take(it))
        check_rows(ids, seg)
        return [int(d[0]) // 1000 - 1 for d in split_docs(stream(ids, seg))], split_docs(stream(ids, seg))

    order, pieces = epoch_docs(7, 2)
    first, second = order[: len(docs)], order[len(docs):]
    assert sorted(first) == sorted(second) == list(range(len(docs)))
    assert first != second and first != list(range(len(docs)))
    for d, piece in zip(order, pieces, strict=True):
        np.testing.assert_array_equal(piece, docs[d])  # each document whole and in order
    assert epoch_docs(7, 2)[0] == order and epoch_docs(8, 2)[0] != order


# ------------------------------------------------------------------ sharding and splits


@pytest.mark.parametrize("count", [1, 2, 3])
def test_process_shards_disjoint_and_covering(records, count):
    path, docs = records
    seen = []
    for pi in range(count):
        with batch_iterator(config(path, global_batch_size=6, num_epochs=1), process_index=pi,
                            process_count=count) as it:
            batches = take(it)
        assert all(b["input_ids"].shape == (6 // count, 16) for b in batches)
        ids, seg = rows_of(batches)
        check_rows(ids, seg)
        seen.append({int(d[0]) // 1000 - 1 for d in split_docs(stream(ids, seg))})
    assert sum(len(s) for s in seen) == len(docs) and set().union(*seen) == set(range(len(docs)))


def test_validation_fraction_holds_out_documents(records):
    path, docs = records
    got = {}
    for split in ("train", "validation"):
        cfg = config(path, validation_fraction=0.2, num_epochs=1)
        with batch_iterator(cfg, split, process_index=0, process_count=1) as it:
            ids, seg = rows_of(take(it))
        got[split] = {int(d[0]) // 1000 - 1 for d in split_docs(stream(ids, seg))}
    assert len(got["validation"]) == 12 and not got["train"] & got["validation"]
    assert got["train"] | got["validation"] == set(range(len(docs)))


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("k,shuffle_rows", [(0, 0), (1, 0), (3, 0), (11, 0), (3, 8), (11, 8)])
def test_resume_is_exact(records, k, shuffle_rows):
    path, _ = records
    # Prefetch and reader threads on, forever, and enough steps to cross epochs (60 documents ~ 20 batches).
    cfg = config(path, prefetch=3, read_threads=2, seed=3, shuffle_rows=shuffle_rows)
    with batch_iterator(cfg, process_index=1, process_count=2) as it:
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        after = take(it, 30)
    with batch_iterator(cfg, process_index=1, process_count=2) as fresh:
        fresh.set_state(state)
        resumed = take(fresh, 30)
    for a, b in zip(after, resumed, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
    # A state of another process's share (or other data) is refused, not silently misread.
    with batch_iterator(cfg, process_index=0, process_count=2) as other, pytest.raises(DataError, match="fingerpr"):
        other.set_state(state)


# ------------------------------------------------------------------ text, JSONL and the pre-tokenized format


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    files = tokmod.stdlib_sources()[:12]
    return tokmod.train_bpe(files, 400)


def test_text_and_jsonl_tokenized(tmp_path, small_tokenizer):
    tok = small_tokenizer
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n", "class A:\n    pass\n", "é ∑ 🙂"]
    (tmp_path / "a.py").write_text(texts[0])
    lines = [json.dumps({"content": t, "id": i}) for i, t in enumerate(texts[1:])]
    (tmp_path / "b.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]))  # a blank line, no final "\n"
    cfg = DataConfig(train_files=(str(tmp_path / "a.py"), str(tmp_path / "b.jsonl")), seq_len=8,
                     global_batch_size=2, jsonl_field="content", eos_id=1, shuffle=False, num_epochs=1)
    with batch_iterator(cfg, tokenizer=tok, process_index=0, process_count=1) as it:
        ids, seg = rows_of(take(it))
    expected = np.concatenate([tok.encode(t, add_special_tokens=False).ids + [1] for t in texts])
    np.testing.assert_array_equal(stream(ids, seg), expected)
    assert tok.decode(list(stream(ids, seg)[: len(expected) - 1]), skip_special_tokens=True) == "".join(texts)

    # The tokenizer can come from the config's path; a glob names the same files.
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    cfg2 = DataConfig(**{**cfg.to_dict(), "train_files": [str(tmp_path / "*")],
                         "tokenizer": str(tmp_path / "tok" / "tokenizer.json")})
    with batch_iterator(cfg2, process_index=0, process_count=1) as it:
        np.testing.assert_array_equal(rows_of(take(it))[0], ids)

    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not JSON"):
        take(batch_iterator(DataConfig(**{**cfg.to_dict(), "train_files": [str(tmp_path / "bad.jsonl")]}),
                            tokenizer=tok, process_index=0, process_count=1))
    with pytest.raises(DataError, match=r"line 1: no string field 'text'"):
        take(batch_iterator(DataConfig(train_files=(str(tmp_path / "b.jsonl"),), seq_len=8, global_batch_size=1,
                                       num_epochs=1), tokenizer=tok, process_index=0, process_count=1))


def test_pretokenized_round_trip(tmp_path, small_tokenizer):
    docs = make_docs(7)
    write_arrayrecord(tmp_path / "x.arrayrecord", docs)
    source = grain.sources.ArrayRecordDataSource([str(tmp_path / "x.arrayrecord")])
    assert len(source) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(_decode_record(source[i]), d)

    # JSONL -> ArrayRecord gives the same batches as tokenizing the JSONL on the fly.
    texts = [f"x{i} = {i} * {i}\n" * (i + 1) for i in range(9)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    n, tokens = convert_to_arrayrecord([tmp_path / "c.jsonl"], tmp_path / "c.arrayrecord", small_tokenizer)
    assert n == 9 and tokens == sum(len(small_tokenizer.encode(t).ids) for t in texts)
    out = []
    for name in ("c.jsonl", "c.arrayrecord"):
        cfg = DataConfig(train_files=(str(tmp_path / name),), seq_len=32, global_batch_size=2, eos_id=1, seed=5)
        with batch_iterator(cfg, tokenizer=small_tokenizer, process_index=0, process_count=1) as it:
            out.append(take(it, 6))
    for a, b in zip(*out, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])


# ------------------------------------------------------------------ labels and config


def test_next_token_labels_stay_in_document():
    ids = np.array([[5, 6, 7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16, 17, 18]], np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
    labels, weights = map(np.asarray, next_token_labels(ids, seg))
    np.testing.assert_array_equal(labels, [[6, 7, 0, 9, 0, 0, 0, 0], [12, 13, 14, 0, 16, 17, 18, 0]])
    np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1, 1, 0]])
    assert labels.dtype == np.int32 and weights.dtype == np.float32

    rng = np.random.default_rng(0)
    seg = np.sort(rng.integers(0, 5, (3, 64)), axis=1)[:, ::-1].copy()  # runs, padding (0) at the end
    seg = np.where(seg > 0, 5 - seg, 0)
    ids = rng.integers(1, 100, (3, 64)).astype(np.int32)
    labels, weights = map(np.asarray, next_token_labels(ids, seg))
    on = weights[:, :-1] > 0
    assert (seg[:, :-1][on] == seg[:, 1:][on]).all() and (seg[:, :-1][on] != 0).all()
    assert (labels[:, :-1][on] == ids[:, 1:][on]).all() and (labels[weights == 0] == 0).all()
    assert on.sum() == ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)).sum()


@pytest.mark.parametrize("change, field", [
    ({"seq_len": 0}, "seq_len"),
    ({"global_batch_size": 2.0}, "global_batch_size"),
    ({"train_files": "data.jsonl"}, "train_files"),
    ({"format": "parquet"}, "format"),
    ({"seed": 2**32}, "seed"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"validation_fraction": 0.1, "validation_files": ["v.jsonl"]}, "validation_fraction"),
    ({"shuffle": "yes"}, "shuffle"),
    ({"batch_size": 8}, "batch_size"),
])
def test_bad_config_names_field(change, field):
    d = {"train_files": ["t.jsonl"], "seq_len": 16, "global_batch_size": 8, **change}
    with pytest.raises(ConfigError, match=rf"DataConfig\.{field}:"):
        DataConfig.from_dict(d)


def test_config_errors_at_build(records, tmp_path):
    path, _ = records
    with pytest.raises(ConfigError, match=r"DataConfig.global_batch_size: .* not divisible by the 3"):
        batch_iterator(config(path), process_index=0, process_count=3)
    with pytest.raises(ConfigError, match=r"DataConfig.train_files: .*nothing\*.jsonl' matches no file"):
        batch_iterator(config(tmp_path / "nothing*.jsonl"), process_index=0, process_count=1)
    (tmp_path / "t.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"DataConfig.tokenizer: needed to tokenize"):
        batch_iterator(config(tmp_path / "t.txt"), process_index=0, process_count=1)
    with pytest.raises(ConfigError, match=r"no validation split"):
        batch_iterator(config(path), "validation", process_index=0, process_count=1)


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_trains_and_round_trips_python(tmp_path, small_tokenizer):
    root = tokmod.stdlib_root()
    files = tokmod.stdlib_sources()
    assert files == sorted(files) and len(files) > 100
    assert not any({"test", "tests", "site-packages"} & set(p.relative_to(root).parts[:-1]) for p in files)
    train, val = tokmod.split_files(files, root, 0.1)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(files) and 0 < len(val) < len(files) // 4
    assert tokmod.split_files(list(reversed(files)), root, 0.1)[1] == list(reversed(val))  # order-free

    tok = small_tokenizer
    assert tok.get_vocab_size() == 400
    assert tok.token_to_id(tokmod.PAD) == 0 and tok.token_to_id(tokmod.EOS) == 1
    for path in (val[0], val[-1]):
        text = Path(path).read_text("utf-8")
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text and len(ids) < len(text.encode()) * 0.7  # merges learned

    demo = tokmod.build_demo_tokenizer(tmp_path, 300, root=root / "json")  # a small sub-corpus: fast
    again = type(tok).from_file(str(demo.path))
    assert demo.path.name == "tokenizer.json" and again.get_vocab_size() == 300 and demo.eos_id == 1
    reused = tokmod.build_demo_tokenizer(tmp_path, 300, root=root / "json")  # a resumed run keeps its ids
    assert reused.seconds == 0.0 and reused.path.read_bytes() == demo.path.read_bytes()
    # A tokenizer of another corpus, split or size is refused, never silently reused or retrained over.
    with pytest.raises(ValueError, match="corpus_sha256"):
        tokmod.build_demo_tokenizer(tmp_path, 300, root=root / "email")
    with pytest.raises(ValueError, match="vocab_size 300 there, 301 here"):
        tokmod.build_demo_tokenizer(tmp_path, 301, root=root / "json")
    with pytest.raises(ValueError, match="validation_fraction"):
        tokmod.build_demo_tokenizer(tmp_path, 300, root=root / "json", validation_fraction=0.5)
    (tmp_path / tokmod.MANIFEST).unlink()
    with pytest.raises(ValueError, match="has no record of its corpus"):
        tokmod.build_demo_tokenizer(tmp_path, 300, root=root / "json")
