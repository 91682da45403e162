"""Data pipeline: formats, implicit prompts, boundary tokenization, truncation, skips, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from fastdpo import data
from fastdpo.errors import UserError


def tokenize_rows(tok, rows, **kw):
    import datasets

    args = data.DataOptions(dataset="mem", **kw)
    kept, skips, stats = data.tokenize_dataset(datasets.Dataset.from_list(rows), tok, args)
    return kept, skips, stats


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- formats


def test_standard_format_bos_once_eos_appended(tiny_tokenizer):
    tok = tiny_tokenizer
    kept, skips, _ = tokenize_rows(tok, [{"prompt": "Hello", "chosen": " world", "rejected": " Paris"}])
    row = kept[0]
    assert row["id"] == 0 and not skips
    assert row["prompt_ids"][0] == tok.bos_token_id and row["prompt_ids"].count(tok.bos_token_id) == 1
    assert row["chosen_ids"][-1] == tok.eos_token_id and row["rejected_ids"][-1] == tok.eos_token_id
    assert row["prompt_ids"] + row["chosen_ids"][:-1] == [tok.bos_token_id] + ids(tok, "Hello world")
    assert row["prompt_ids"] + row["rejected_ids"][:-1] == [tok.bos_token_id] + ids(tok, "Hello Paris")


def test_existing_eos_not_doubled(tiny_tokenizer):
    tok = tiny_tokenizer
    kept, _, _ = tokenize_rows(tok, [{"prompt": "Hi", "chosen": " world</s>", "rejected": " Paris"}])
    assert kept[0]["chosen_ids"].count(tok.eos_token_id) == 1


def test_boundary_tokens_split_from_joint_tokenization(tiny_tokenizer):
    """A prompt that ends mid-word: the straddling token belongs to the completion, never re-tokenized."""
    tok = tiny_tokenizer
    prompt, chosen, rejected = "Hello wor", "ld", "ds"
    separate = ids(tok, prompt) + ids(tok, chosen)
    joint = ids(tok, prompt + chosen)
    assert separate != joint, "test needs a tokenizer that merges across this boundary"
    kept, _, stats = tokenize_rows(tok, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    row = kept[0]
    assert row["prompt_ids"] + row["chosen_ids"] == [tok.bos_token_id] + joint + [tok.eos_token_id]
    assert row["prompt_ids"] + row["rejected_ids"] == [tok.bos_token_id] + ids(tok, prompt + rejected) + [
        tok.eos_token_id]
    assert stats["boundary_merges"] == 1
    assert tok.decode(row["chosen_ids"][:-1]).endswith("world")  # " world" moved to the completion


def chat_ids(tok, messages, **kw):
    return list(tok.apply_chat_template(messages, tokenize=True, **kw)["input_ids"])


def test_conversational_equals_apply_chat_template(tiny_tokenizer):
    """The prompt is what inference feeds the model, the sequence what the template renders for the whole
    conversation: the template's own BOS (none in this one) and end of turn, nothing added."""
    tok = tiny_tokenizer
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    chosen = [{"role": "assistant", "content": "Paris"}]
    rejected = [{"role": "assistant", "content": "Berlin"}]
    kept, skips, stats = tokenize_rows(tok, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    row = kept[0]
    assert row["prompt_ids"] == chat_ids(tok, prompt, add_generation_prompt=True)
    assert row["prompt_ids"] + row["chosen_ids"] == chat_ids(tok, prompt + chosen)
    assert row["prompt_ids"] + row["rejected_ids"] == chat_ids(tok, prompt + rejected)
    assert tok.decode(row["chosen_ids"]) == "Paris<|im_end|>\n" and tok.bos_token_id not in row["prompt_ids"]
    assert stats["turns_rendered_apart"] == 0 and stats["boundary_merges"] == 0


def test_chat_bos_tokenizer_adds_the_bos_the_template_omits(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    kept, _, _ = tokenize_rows(tok, [row], chat_bos="tokenizer")
    assert kept[0]["prompt_ids"] == [tok.bos_token_id] + chat_ids(tok, row["prompt"], add_generation_prompt=True)
    assert kept[0]["chosen_ids"] == chat_ids(tok, row["prompt"] + row["chosen"])[len(kept[0]["prompt_ids"]) - 1:]


def test_conversational_string_prompt_and_completions_are_wrapped(tiny_tokenizer):
    tok = tiny_tokenizer
    kept, _, _ = tokenize_rows(tok, [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello",
                                      "rejected": "world"}])
    assert "<|im_start|>assistant" in tok.decode(kept[0]["prompt_ids"], skip_special_tokens=False)


def test_implicit_prompt_strings_hh_style(tiny_tokenizer):
    tok = tiny_tokenizer
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Paris."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Berlin."
    kept, skips, _ = tokenize_rows(tok, [{"chosen": chosen, "rejected": rejected}])
    row = kept[0]
    assert tok.decode(row["prompt_ids"], skip_special_tokens=True).endswith("Capital of France?\n\nAssistant:")
    assert tok.decode(row["chosen_ids"], skip_special_tokens=True) == " Paris."
    assert tok.decode(row["rejected_ids"], skip_special_tokens=True) == " Berlin."


def test_implicit_prompt_shared_text_after_marker_stays_in_completion(tiny_tokenizer):
    """Both answers start with 'The': the prompt still ends at the marker, not inside the answer."""
    kept, _, _ = tokenize_rows(tiny_tokenizer, [{"chosen": "\n\nHuman: q\n\nAssistant: The cat",
                                                 "rejected": "\n\nHuman: q\n\nAssistant: The dog"}])
    assert tiny_tokenizer.decode(kept[0]["chosen_ids"], skip_special_tokens=True) == " The cat"


def test_implicit_prompt_conversations(tiny_tokenizer):
    tok = tiny_tokenizer
    shared = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "capital?"}]
    kept, _, _ = tokenize_rows(tok, [{"chosen": shared + [{"role": "assistant", "content": "Paris"}],
                                      "rejected": shared + [{"role": "assistant", "content": "Rome"}]}])
    row = kept[0]
    assert row["prompt_ids"] == chat_ids(tok, shared, add_generation_prompt=True)
    assert tok.decode(row["chosen_ids"], skip_special_tokens=False) == "Paris<|im_end|>\n"


def test_implicit_prompt_without_marker_is_skipped(tiny_tokenizer):
    _, skips, _ = tokenize_rows(tiny_tokenizer, [{"chosen": "abc", "rejected": "abd"}])
    assert skips == {"no_prompt_found": 1}


def test_column_remap(tiny_tokenizer):
    kept, _, _ = tokenize_rows(tiny_tokenizer, [{"q": "Hello", "good": " world", "bad": " Paris"}],
                               prompt_column="q", chosen_column="good", rejected_column="bad")
    assert len(kept) == 1


# ---------------------------------------------------------------- truncation


def test_max_prompt_length_keep_end_keeps_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = " ".join(["hello world"] * 20)
    kept, _, _ = tokenize_rows(tok, [{"prompt": prompt, "chosen": " Paris", "rejected": " France"}],
                               max_prompt_length=5)
    full = [tok.bos_token_id] + ids(tok, prompt + " Paris")
    p = kept[0]["prompt_ids"]
    assert len(p) == 5 and p[0] == tok.bos_token_id
    # the kept end is the end of the untruncated prompt
    untrunc, _, _ = tokenize_rows(tok, [{"prompt": prompt, "chosen": " Paris", "rejected": " France"}],
                                  max_prompt_length=None)
    assert p[1:] == untrunc[0]["prompt_ids"][-4:]
    assert untrunc[0]["prompt_ids"] + untrunc[0]["chosen_ids"][:-1] == full


def test_max_prompt_length_keep_start(tiny_tokenizer):
    prompt = " ".join(["hello world"] * 20)
    untrunc, _, _ = tokenize_rows(tiny_tokenizer, [{"prompt": prompt, "chosen": " Paris", "rejected": " France"}],
                                  max_prompt_length=None)
    kept, _, _ = tokenize_rows(tiny_tokenizer, [{"prompt": prompt, "chosen": " Paris", "rejected": " France"}],
                               max_prompt_length=6, truncation="keep_start")
    assert kept[0]["prompt_ids"] == untrunc[0]["prompt_ids"][:6]


def test_max_length_cuts_completion_only(tiny_tokenizer):
    row = {"prompt": "Hello", "chosen": " world hello world hello world", "rejected": " Paris France Paris"}
    full, _, _ = tokenize_rows(tiny_tokenizer, [row], max_length=None)
    p = len(full[0]["prompt_ids"])
    kept, _, _ = tokenize_rows(tiny_tokenizer, [row], max_length=p + 2)
    assert kept[0]["prompt_ids"] == full[0]["prompt_ids"]
    assert kept[0]["chosen_ids"] == full[0]["chosen_ids"][:2]
    assert kept[0]["rejected_ids"] == full[0]["rejected_ids"][:2]


def test_max_length_exactly_one_completion_token(tiny_tokenizer):
    row = {"prompt": "Hello", "chosen": " world", "rejected": " Paris"}
    full, _, _ = tokenize_rows(tiny_tokenizer, [row], max_length=None)
    p = len(full[0]["prompt_ids"])
    kept, skips, _ = tokenize_rows(tiny_tokenizer, [row], max_length=p + 1)
    assert len(kept[0]["chosen_ids"]) == 1 and not skips
    _, skips, _ = tokenize_rows(tiny_tokenizer, [row], max_length=p)
    assert skips == {"prompt_too_long": 1}


def test_identical_after_truncation_is_skipped(tiny_tokenizer):
    row = {"prompt": "Hello", "chosen": " world hello", "rejected": " world Paris"}
    full, _, _ = tokenize_rows(tiny_tokenizer, [row], max_length=None)
    p = len(full[0]["prompt_ids"])
    _, skips, _ = tokenize_rows(tiny_tokenizer, [row], max_length=p + 1)
    assert skips == {"identical_after_truncation": 1}


def test_identical_after_rendering_is_not_called_truncation(tiny_tokenizer):
    """Chosen " world</s>" and rejected " world" differ as text, but are one sequence once EOS is appended to the
    second: nothing was cut, so the reason says so."""
    row = {"prompt": "Hello", "chosen": " world</s>", "rejected": " world"}
    _, skips, _ = tokenize_rows(tiny_tokenizer, [row], max_length=None)
    assert skips == {"identical_after_rendering": 1}


# ---------------------------------------------------------------- skips and bad input


BAD_ROWS = [
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "missing_value"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty_text"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen_equals_rejected"),
    ({"prompt": "p", "chosen": " x", "rejected": " y"}, None),
]


@pytest.mark.parametrize("row,reason", BAD_ROWS, ids=[str(r) for _, r in BAD_ROWS])
def test_bad_rows_are_counted_skips(tiny_tokenizer, row, reason):
    good = {"prompt": "Hello", "chosen": " world", "rejected": " Paris"}
    kept, skips, stats = tokenize_rows(tiny_tokenizer, [good, row, good])
    assert skips == ({reason: 1} if reason else {})
    assert kept["id"] == ([0, 2] if reason else [0, 1, 2]) and stats["rows_read"] == 3


def test_malformed_messages_are_skipped(tiny_tokenizer):
    msg = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    good = {"prompt": msg("q"), "chosen": msg("a"), "rejected": msg("b")}
    bad = {"prompt": msg("q"), "chosen": [{"role": "assistant", "content": None}], "rejected": msg("b")}
    kept, skips, _ = tokenize_rows(tiny_tokenizer, [good, bad])
    assert skips == {"malformed_messages": 1} and kept["id"] == [0]


def test_strict_names_the_row(tiny_tokenizer):
    good = {"prompt": "Hello", "chosen": " world", "rejected": " Paris"}
    with pytest.raises(UserError, match=r"row 1 .*chosen and rejected are identical"):
        tokenize_rows(tiny_tokenizer, [good, {"prompt": "p", "chosen": "x", "rejected": "x"}], strict=True)


def test_mixed_type_jsonl_rows_are_skipped_not_fatal(tmp_path, tiny_tokenizer):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "Hello", "chosen": " world", "rejected": " Paris"},
            {"prompt": "Hello", "chosen": 12, "rejected": " Paris"},
            {"prompt": "Hello", "chosen": " France", "rejected": " Paris"}]
    write_jsonl(path, rows)
    ds = data.load_source(data.DataOptions(dataset=str(path)))
    kept, skips, _ = data.tokenize_dataset(ds, tiny_tokenizer, data.DataOptions(dataset=str(path)))
    assert kept["id"] == [0, 2] and skips == {"wrong_type": 1}


def test_missing_column_lists_columns(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "good": "b", "rejected": "c"}])
    args = data.DataOptions(dataset=str(path))
    ds = data.load_source(args)
    with pytest.raises(UserError, match=r"no column 'chosen' \(--chosen-column\); columns found: prompt, good, "
                                        r"rejected"):
        data.tokenize_dataset(ds, tiny_tokenizer, args)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(UserError, match=rf"{path}:2: invalid JSON"):
        data.load_source(data.DataOptions(dataset=str(path)))


def test_missing_dataset_names_path(tmp_path):
    with pytest.raises(UserError, match=r"dataset not found: .*nope\.jsonl"):
        data.load_source(data.DataOptions(dataset=str(tmp_path / "nope.jsonl")))


@pytest.mark.parametrize("ext", ["parquet", "csv", "json"])
def test_file_formats_and_directories(tmp_path, tiny_tokenizer, ext):
    import datasets

    rows = [{"prompt": "Hello", "chosen": " world", "rejected": " Paris"}] * 3
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{ext}"
    if ext == "parquet":
        ds.to_parquet(path)
    elif ext == "csv":
        ds.to_csv(path, index=False)
    else:
        path.write_text(json.dumps(rows))
    for source in (path, tmp_path):
        loaded = data.load_source(data.DataOptions(dataset=str(source)))
        assert len(loaded) == 3 and loaded[0]["chosen"] == " world"


def test_arrow_file(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "Hello", "chosen": " world", "rejected": " Paris"}] * 2)
    ds.save_to_disk(tmp_path / "saved")
    assert len(data.load_source(data.DataOptions(dataset=str(tmp_path / "saved")))) == 2
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert len(data.load_source(data.DataOptions(dataset=str(arrow)))) == 2


def test_conversational_without_chat_template_is_one_error(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        tokenize_rows(tok, [{"prompt": [{"role": "user", "content": "hi"}],
                             "chosen": [{"role": "assistant", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]}])
