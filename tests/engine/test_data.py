import hashlib
import itertools
import json
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from replica_agent.engine.data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    Example,
    LocalDataset,
    append_feedback,
    read_examples,
    stdlib_package_dir,
)

BOS, EOS, PAD = 256, 257, 258


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level tokenizer whose token id is the byte value; specials get 256, 257, 258."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)
    return tok


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def all_chunks(ds):
    """Every chunk of the dataset as (ids, labels) tuples: train once (one epoch) plus eval."""
    train = list(itertools.islice(ds.train_batches(1), ds.train_chunks))
    rows = [(tuple(b.input_ids[0].tolist()), tuple(b.labels[0].tolist())) for b in train]
    for b in ds.eval_batches(1):
        rows.append((tuple(b.input_ids[0].tolist()), tuple(b.labels[0].tolist())))
    return sorted(rows)


def text_examples(n=60):
    """Documents whose chunks all differ, so chunks can be told apart by their ids."""
    return [Example(text=f"document {i:03d} {hashlib.sha256(str(i).encode()).hexdigest()}") for i in range(n)]


# --- reading ---------------------------------------------------------------------------------


def test_jsonl_text_and_prompt_completion_with_exact_ids_and_masks(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ab"}\n\n{"prompt": "x", "completion": "yz"}\n')
    examples = read_examples(path)
    assert examples == [Example(text="ab"), Example(prompt="x", completion="yz")]

    ds = LocalDataset(examples, tokenizer, seq_len=4)
    # Stream: <s> a b </s> | <s> x y z </s>. The third chunk (</s> + padding) has no label after
    # position 0, which the shifted loss never uses, so it is dropped.
    assert all_chunks(ds) == sorted(
        [
            ((BOS, 97, 98, EOS), (BOS, 97, 98, EOS)),
            ((BOS, 120, 121, 122), (IGNORE_INDEX, IGNORE_INDEX, 121, 122)),
        ]
    )
    assert (ds.train_chunks, ds.eval_chunks) == (1, 1)


def test_last_partial_chunk_is_padded_with_masked_labels(tokenizer):
    ds = LocalDataset([Example(text="abcde")], tokenizer, seq_len=4)  # <s> a b c | d e </s> pad
    assert all_chunks(ds) == sorted(
        [
            ((BOS, 97, 98, 99), (BOS, 97, 98, 99)),
            ((100, 101, EOS, PAD), (100, 101, EOS, IGNORE_INDEX)),
        ]
    )


def test_batch_tokens_counts_labelled_positions():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6], [7, IGNORE_INDEX, IGNORE_INDEX]])
    assert Batch(torch.zeros_like(labels), labels).tokens == 3


@pytest.mark.parametrize(
    "bad_line, hint",
    [
        ('{"text": "ok"', "not valid JSON"),
        ('["text"]', "JSON object"),
        ('{"prompt": "only a prompt"}', "completion"),
        ('{"text": 3}', "text"),
        ('{"prompt": "p", "completion": ["c"]}', "strings"),
        ('{"text": "t", "prompt": "p", "completion": "c"}', "not both"),
        ('{"text": ""}', "non-empty"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, hint):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad_line + "\n")
    with pytest.raises(DataError, match="line 3") as info:
        read_examples(path)
    assert str(path) in str(info.value) and hint in str(info.value)


def test_folder_recursive_include_globs_sorted_and_undecodable_skipped(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    (tmp_path / "z.py").write_text("zed")
    (tmp_path / "sub" / "b.md").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "empty.py").write_text("\n")
    (tmp_path / "data.bin").write_bytes(b"binary")
    (tmp_path / "sub" / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"prompt": "p", "completion": "c"}])
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("hidden")
    (tmp_path / ".hidden.md").write_text("hidden")

    with caplog.at_level(logging.WARNING):
        examples = read_examples(tmp_path)
    assert examples == [
        Example(text="ay"),
        Example(text="bee"),
        Example(prompt="p", completion="c"),
        Example(text="zed"),
    ]
    assert "bad.txt" in caplog.text
    assert read_examples(tmp_path, include=["*.md", "*.py"]) == [Example(text="bee"), Example(text="zed")]
    assert read_examples(tmp_path, include=["sub/*"]) == [Example(text="bee"), Example(prompt="p", completion="c")]


def test_single_plain_text_file(tmp_path):
    path = tmp_path / "notes.log"
    path.write_text("hello\nworld\n")
    assert read_examples(path) == [Example(text="hello\nworld\n")]


def test_empty_or_missing_sources_raise(tmp_path, tokenizer):
    with pytest.raises(DataError, match="empty dataset"):
        read_examples(tmp_path)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty dataset"):
        LocalDataset.from_path(tmp_path, tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope")


def test_too_little_data_for_two_chunks(tokenizer):
    with pytest.raises(DataError, match=r"at least 130 tokens.*lower seq_len"):
        LocalDataset([Example(text="short")], tokenizer, seq_len=128)


# --- split -----------------------------------------------------------------------------------


def test_split_is_deterministic_and_depends_on_seed(tokenizer):
    examples = text_examples()
    a = LocalDataset(examples, tokenizer, seq_len=32, eval_fraction=0.2, seed=1)
    b = LocalDataset(examples, tokenizer, seq_len=32, eval_fraction=0.2, seed=1)
    c = LocalDataset(examples, tokenizer, seq_len=32, eval_fraction=0.2, seed=2)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert all_chunks(a) == all_chunks(c)  # same chunks, other split
    eval_a = [b.input_ids for b in a.eval_batches(64)]
    eval_c = [b.input_ids for b in c.eval_batches(64)]
    assert not torch.equal(torch.cat(eval_a), torch.cat(eval_c))
    assert a.train_chunks > 0 and a.eval_chunks > 0
    assert a.train_chunks + a.eval_chunks == len(all_chunks(a))


def test_split_guarantees_both_sides_and_caps_eval(tokenizer):
    examples = text_examples()
    total = len(all_chunks(LocalDataset(examples, tokenizer, seq_len=32)))
    tiny = LocalDataset(examples, tokenizer, seq_len=32, eval_fraction=1e-9)
    assert (tiny.train_chunks, tiny.eval_chunks) == (total - 1, 1)
    huge = LocalDataset(examples, tokenizer, seq_len=32, eval_fraction=1 - 1e-9, max_eval_chunks=10_000)
    assert (huge.train_chunks, huge.eval_chunks) == (1, total - 1)
    capped = LocalDataset(examples, tokenizer, seq_len=32, eval_fraction=0.5, max_eval_chunks=3)
    assert (capped.train_chunks, capped.eval_chunks) == (total - 3, 3)
    assert capped.train_tokens == sum(b.tokens for b in itertools.islice(capped.train_batches(1), total - 3))


def test_different_stdlib_packages_give_different_data(tokenizer):
    json_dir = stdlib_package_dir("json")
    assert (json_dir / "decoder.py").is_file()
    a = LocalDataset.from_path(json_dir, tokenizer)
    b = LocalDataset.from_path(stdlib_package_dir("html"), tokenizer)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == LocalDataset.from_path(json_dir, tokenizer).fingerprint()
    for bad in ("no_such_package_xyz", "json.decoder", "../json", ""):
        with pytest.raises(DataError, match="standard-library package"):
            stdlib_package_dir(bad)


# --- batches ---------------------------------------------------------------------------------


def test_train_batches_infinite_reshuffled_per_epoch_and_seeded(tokenizer):
    ds = LocalDataset(text_examples(), tokenizer, seq_len=32, eval_fraction=0.2)
    n = ds.train_chunks

    def rows(seed, count):
        batches = itertools.islice(ds.train_batches(1, seed=seed), count)
        return [tuple(b.input_ids[0].tolist()) for b in batches]

    stream = rows(7, 3 * n)  # three epochs: the iterator does not end
    epochs = [stream[i * n : (i + 1) * n] for i in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == n and sorted(epoch) == sorted(epochs[0])  # a permutation
    assert epochs[0] != epochs[1] != epochs[2]
    assert rows(7, 2 * n) == stream[: 2 * n]
    assert rows(8, n) != epochs[0]
    assert rows(None, n) == rows(ds.seed, n)

    for batch in itertools.islice(ds.train_batches(5), 2 * n):  # batches straddle epochs, shape is fixed
        assert batch.input_ids.shape == batch.labels.shape == (5, 32)
        assert batch.input_ids.dtype == batch.labels.dtype == torch.long


def test_eval_batches_cover_each_eval_chunk_once(tokenizer):
    ds = LocalDataset(text_examples(), tokenizer, seq_len=32, eval_fraction=0.3)
    whole = next(ds.eval_batches(ds.eval_chunks))
    batches = list(ds.eval_batches(4))
    assert [len(b.input_ids) for b in batches[:-1]] == [4] * (len(batches) - 1)
    assert torch.equal(torch.cat([b.input_ids for b in batches]), whole.input_ids)
    assert len({tuple(r.tolist()) for r in whole.input_ids}) == ds.eval_chunks
    assert list(ds.eval_batches(4))[0].input_ids.equal(batches[0].input_ids)  # fixed order
    with pytest.raises(ValueError):
        next(ds.eval_batches(0))


@settings(max_examples=25, deadline=None)
@given(
    docs=st.lists(
        st.one_of(
            st.builds(Example, text=st.text(min_size=1, max_size=40)),
            st.builds(Example, prompt=st.text(max_size=20), completion=st.text(min_size=1, max_size=20)),
        ),
        min_size=1,
        max_size=12,
    ),
    seq_len=st.integers(2, 16),
)
def test_packed_chunks_invariants(tokenizer, docs, seq_len):
    try:
        ds = LocalDataset(docs, tokenizer, seq_len=seq_len)
    except DataError as exc:
        assert "at least" in str(exc)
        return
    assert ds.train_chunks >= 1 and ds.eval_chunks >= 1
    for ids, labels in all_chunks(ds):
        assert len(ids) == len(labels) == seq_len
        assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(labels, ids))
        assert any(lab != IGNORE_INDEX for lab in labels[1:])


# --- feedback --------------------------------------------------------------------------------


def test_append_feedback_round_trips(tmp_path):
    path = tmp_path / "new" / "folder" / "feedback.jsonl"
    append_feedback(path, "Q: 2+2?", "4")
    append_feedback(path, 'quote " and ünïcode\n', "line\nbreak\u2028separator\x85")
    assert read_examples(path) == [
        Example(prompt="Q: 2+2?", completion="4"),
        Example(prompt='quote " and ünïcode\n', completion="line\nbreak\u2028separator\x85"),
    ]


def test_append_feedback_after_a_line_without_newline(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "last line has no newline"}')
    append_feedback(path, "p", "c")
    assert read_examples(path) == [Example(text="last line has no newline"), Example(prompt="p", completion="c")]


@pytest.mark.parametrize("prompt, completion", [("", "c"), ("p", ""), (None, "c"), ("p", 3)])
def test_append_feedback_rejects_empty_or_non_strings(tmp_path, prompt, completion):
    with pytest.raises(DataError, match="non-empty string"):
        append_feedback(tmp_path / "f.jsonl", prompt, completion)
    assert not (tmp_path / "f.jsonl").exists()


def test_append_feedback_needs_a_jsonl_file(tmp_path):
    with pytest.raises(DataError, match=".jsonl"):
        append_feedback(tmp_path / "f.txt", "p", "c")
