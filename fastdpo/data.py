"""Preference data: loading, formats, prompt extraction, tokenization and truncation.

Flow: `load_source` (datasets: Hub id, file or directory) -> `tokenize_dataset` (one pass of
`Dataset.map`) -> rows of `id, prompt_ids, chosen_ids, rejected_ids`, plus skip counts by reason.

Formats, detected per dataset from the first usable row:
- standard: `prompt`, `chosen`, `rejected` strings; the sequence is prompt + completion, with the
  tokenizer's BOS once (where it adds one) and EOS appended when the completion lacks it.
- conversational: lists of `{role, content}` messages. The prompt is what inference feeds the model:
  the chat template's rendering of the prompt messages with `add_generation_prompt=True`. The
  completion is the assistant turn as the template renders it after that prompt. Nothing is added:
  BOS and end-of-turn tokens are the template's own (`--chat-bos tokenizer` adds a BOS it omits).
- implicit prompt: only `chosen` / `rejected`. The prompt is their shared prefix, ending at the last
  assistant marker (strings, e.g. HH-RLHF's "\\n\\nAssistant:") or at the last shared message.

Tokenization: prompt+completion is tokenized as one text, and the prompt/completion split is the
longest token prefix shared by the prompt alone and both full sequences. A token that straddles
the boundary belongs to the completion, so the model scores exactly the tokens it would see.

Some chat templates render the prompt differently inside the whole conversation than alone (Mistral
v0.3's and Nemo's put the system message in the last user turn only, so it vanishes once an
assistant turn follows). The conversation's rendering then does not start with the prompt's, and the
completion is the assistant turn rendered on its own (`RowTokenizer._turn`): the training sequence
is the inference prompt followed by that turn, so the system prompt stays in the prompt. Where the
turn cannot be isolated faithfully the row is skipped (`no_faithful_split`), never split elsewhere.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass

from .errors import UserError, first_line
from .io import DATA_SUFFIXES, is_local_path

FILE_BUILDERS = dict(zip(DATA_SUFFIXES, ("json", "json", "parquet", "csv", "arrow")))  # suffix -> datasets builder

# Skip reasons, counted in the manifest. Each is a row the pipeline cannot keep.
SKIP_REASONS = {
    "missing_value": "a prompt/chosen/rejected field is null or absent",
    "wrong_type": "a field is neither a string nor a list of messages",
    "empty_text": "chosen or rejected is empty",
    "malformed_messages": "a message is not a {role, content} mapping of strings",
    "chosen_equals_rejected": "chosen and rejected are identical",
    "identical_after_rendering": "chosen and rejected differ, but the chat template or tokenizer renders them to the "
                                 "same tokens",
    "no_prompt_found": "implicit prompt: no shared prefix ending at an assistant turn",
    "chat_template_error": "the chat template failed on this conversation",
    "no_faithful_split": "the chat template renders the prompt differently inside the whole conversation and the "
                         "assistant turn cannot be rendered on its own",
    "empty_prompt": "the prompt has no tokens, so the first completion token cannot be scored",
    "empty_completion": "the chat template renders no tokens for chosen or rejected",
    "prompt_too_long": "the prompt leaves no room for a completion within --max-length",
    "identical_after_truncation": "chosen and rejected are identical after truncation to --max-length",
}


@dataclass
class DataOptions:
    """The data options and their defaults, for calling this module outside a command (tests, benchmarks, tools).

    Every function here reads these by name from `args`: this, or a command's config (precompute, train and sft
    each declare the same fields, with their flags and help; tests/test_config.py keeps the copies equal)."""

    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_prompt_length: int | None = 512
    max_length: int | None = 1024
    truncation: str = "keep_end"
    chat_bos: str = "template"
    assistant_marker: str = "\n\nAssistant:"
    limit: int | None = None
    strict: bool = False


DATA_OPTIONS = tuple(f.name for f in dataclasses.fields(DataOptions))


def data_settings(args) -> dict:
    """The data options of `args` (a command's config): what tokenization depends on."""
    return {name: getattr(args, name) for name in DATA_OPTIONS}


# ----------------------------------------------------------------------------------------------
# Loading


def _diagnose_file(path: str) -> str | None:
    """Find the line that makes a JSON/JSONL file unreadable (datasets' own errors rarely say)."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".jsonl" or ext == ".json" and not _starts_with_bracket(path):
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            return f"{path}:{lineno}: invalid JSON ({e.msg})"
                        if not isinstance(obj, dict):
                            return f"{path}:{lineno}: expected a JSON object per line"
        elif ext == ".json":
            with open(path, encoding="utf-8") as fh:
                json.load(fh)
    except json.JSONDecodeError as e:
        return f"{path}:{e.lineno}: invalid JSON ({e.msg})"
    except UnicodeDecodeError as e:
        return f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
    except OSError as e:
        return f"{path}: {e.strerror}"
    return None


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def _load_json_rows_leniently(path: str):
    """JSON lines whose columns change type between rows: keep the rows, mark off-type values.

    Arrow needs one type per column, so a value whose type differs from the column's first
    non-null value is replaced by None and the row marked `wrong_type` (counted as a skip later).
    """
    import datasets

    with open(path, encoding="utf-8") as fh:
        if _starts_with_bracket(path):
            rows = json.load(fh)
        else:
            rows = [json.loads(line) for line in fh if line.strip()]
    kinds: dict[str, type] = {}
    bad = []
    for row in rows:
        marked = False
        for key, value in list(row.items()):
            if value is None:
                continue
            kind = _json_kind(value)
            if kinds.setdefault(key, kind) != kind:
                row[key] = None
                marked = True
        bad.append(marked)
    for row, marked in zip(rows, bad):
        row["__fastdpo_wrong_type__"] = marked
    try:
        return datasets.Dataset.from_list(rows)
    except Exception:  # nested structures that still do not unify: keep the raw JSON text
        flat = [{k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in r.items()} for r in rows]
        for r in flat:
            r["__fastdpo_wrong_type__"] = True
        return datasets.Dataset.from_list(flat)


def _json_kind(value):
    if isinstance(value, list):
        return list if all(isinstance(m, dict) for m in value) else tuple
    return type(value)


def _check_local(args: DataOptions) -> None:
    """Options that only Hub datasets take are refused for local data; a directory must hold one format."""
    name = args.dataset
    if args.dataset_config is not None:
        raise UserError(f"--dataset-config {args.dataset_config!r} selects a Hub dataset's configuration, but "
                        f"{name} is local; drop --dataset-config")
    if os.path.isfile(name) and args.split != "train":
        raise UserError(f"--split {args.split!r}: the local file {name} is a single split; drop --split (or give a "
                        "directory holding one file per split)")
    if os.path.isdir(name) and not _saved_by_datasets(name):
        found: dict[str, str] = {}
        for root, _, files in sorted(os.walk(name)):
            for f in sorted(files):
                builder = FILE_BUILDERS.get(os.path.splitext(f)[1].lower())
                if builder and not f.startswith("."):
                    found.setdefault(builder, os.path.join(root, f))
        if len(found) > 1:
            raise UserError(f"dataset directory {name} mixes file formats ({', '.join(sorted(found.values()))}); "
                            "put one format in a directory, or give a file")


def _saved_by_datasets(path: str) -> bool:
    """A directory written by `Dataset.save_to_disk` (read with `load_from_disk`)."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _cause(exc: BaseException) -> str:
    """The most specific line of a `datasets` error: the innermost cause (datasets wraps the reader's error in
    "An error occurred while generating the dataset")."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    if "column names don't match" in text and "\nto\n" in text:  # pyarrow's CastError: "cast\nSCHEMA\nto\nDICT"
        got, expected = text.split("\nto\n", 1)
        got = [line.split(":")[0] for line in got.splitlines()[1:] if ":" in line]
        expected = re.findall(r"'([^']+)': ", expected.splitlines()[0])
        return (f"its files have different columns (one has {', '.join(got)}; another {', '.join(expected)}); give "
                "files with the same columns")
    return first_line(exc)


def load_source(args: DataOptions):
    """The raw split as a `datasets.Dataset`, or a UserError naming the path / file / line."""
    import datasets

    name = args.dataset
    if os.path.exists(name):
        _check_local(args)
        try:
            if os.path.isdir(name):
                if _saved_by_datasets(name):
                    ds = datasets.load_from_disk(name)
                    if isinstance(ds, datasets.DatasetDict):
                        ds = _pick_split(ds, args.split, name)
                    return ds
                return datasets.load_dataset(name, split=args.split)
            ext = os.path.splitext(name)[1].lower()
            if ext not in FILE_BUILDERS:
                raise UserError(f"dataset file {name} has an unsupported extension; use one of "
                                f"{', '.join(sorted(FILE_BUILDERS))}")
            return datasets.load_dataset(FILE_BUILDERS[ext], data_files=name, split="train")
        except UserError:
            raise
        except Exception as e:
            if os.path.isfile(name):
                diagnosis = _diagnose_file(name)
                if diagnosis:
                    raise UserError(diagnosis) from None
                if name.lower().endswith((".jsonl", ".json")):
                    return _load_json_rows_leniently(name)
            if isinstance(e, ValueError) and "split" in str(e).lower():
                raise UserError(f"dataset {name} has no split {args.split!r}: {first_line(e)}") from None
            raise UserError(f"cannot read dataset {name}: {_cause(e)}") from None
    if is_local_path(name):
        raise UserError(f"dataset not found: {name} (no such file or directory)")
    try:
        return datasets.load_dataset(name, args.dataset_config, split=args.split)
    except Exception as e:
        where = name + (f" (config {args.dataset_config})" if args.dataset_config else "")
        raise UserError(f"cannot load dataset {where} split {args.split!r} from the Hugging Face Hub: "
                        f"{_cause(e)}") from None


def _pick_split(dsd, split, name):
    if split not in dsd:
        raise UserError(f"dataset {name} has no split {split!r}; splits found: {', '.join(dsd)}")
    return dsd[split]


def check_columns(ds, args: DataOptions) -> bool:
    """Exit 2 naming a missing column. Returns whether an explicit prompt column exists."""
    columns = list(ds.column_names)
    for col, flag in ((args.chosen_column, "--chosen-column"), (args.rejected_column, "--rejected-column")):
        if col not in columns:
            raise UserError(f"dataset {args.dataset} has no column {col!r} ({flag}); columns found: "
                            f"{', '.join(columns)}")
    has_prompt = args.prompt_column in columns
    if not has_prompt and args.prompt_column != "prompt":
        raise UserError(f"dataset {args.dataset} has no column {args.prompt_column!r} (--prompt-column); "
                        f"columns found: {', '.join(columns)}")
    return has_prompt


# ----------------------------------------------------------------------------------------------
# Row normalisation: raw values -> (prompt, chosen, rejected) texts or messages, or a skip reason


def _messages(value):
    """A list of {role, content} string mappings, or None if malformed."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _classify(value):
    """'text', 'messages', or a skip reason."""
    if value is None:
        return "missing_value"
    if isinstance(value, str):
        return "text" if value else "empty_text"
    if isinstance(value, list):
        if not value:
            return "empty_text"
        return "messages" if _messages(value) is not None else "malformed_messages"
    return "wrong_type"


def normalise_row(prompt, chosen, rejected, has_prompt: bool, marker: str):
    """Return ("text"|"messages", prompt, chosen_completion, rejected_completion) or a skip reason (str)."""
    kc, kr = _classify(chosen), _classify(rejected)
    for k in (kc, kr):
        if k not in ("text", "messages"):
            return k
    if has_prompt:
        kp = _classify(prompt)
        if kp == "empty_text" and kc == "text" == kr:
            kp = "text"  # an empty string prompt is fine for plain text (BOS gives the context)
        if kp not in ("text", "messages"):
            return kp
        if kc == kr == "text" and kp == "text":
            if chosen == rejected:
                return "chosen_equals_rejected"
            return ("text", prompt, chosen, rejected)
        # Any messages involved: everything becomes messages.
        p = _messages(prompt) if kp == "messages" else [{"role": "user", "content": prompt}]
        c = _messages(chosen) if kc == "messages" else [{"role": "assistant", "content": chosen}]
        r = _messages(rejected) if kr == "messages" else [{"role": "assistant", "content": rejected}]
        if c == r:
            return "chosen_equals_rejected"
        return ("messages", p, c, r)
    # Implicit prompt.
    if kc != kr:
        return "wrong_type"
    if chosen == rejected:
        return "chosen_equals_rejected"
    if kc == "text":
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind(marker) if marker else -1
        if cut < 0:
            return "no_prompt_found"
        end = cut + len(marker)
        if end == len(chosen) or end == len(rejected):
            return "empty_text"
        return ("text", chosen[:end], chosen[end:], rejected[end:])
    c, r = _messages(chosen), _messages(rejected)
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if n == 0:
        return "no_prompt_found"
    if n == len(c) or n == len(r):
        return "empty_text"
    return ("messages", c[:n], c[n:], r[n:])


# ----------------------------------------------------------------------------------------------
# Tokenization


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# The user turn that completions are rendered after when a chat template cannot render them after the row's own
# prompt (`RowTokenizer._turn`); its text must never reach a completion.
PROBE = [{"role": "user", "content": "fastdpo probe: answer the next turn"}]


class RowTokenizer:
    """Turns raw rows into token ids; a batched `Dataset.map` function.

    Subclasses say how a raw row becomes `(kind, prompt, [completion, ...])` (`normalise`) and which
    output column each completion fills (`targets`). The rest is shared: render, tokenize the prompt
    alone and with each completion, split at the longest common token prefix, BOS/EOS, truncate.
    """

    targets: tuple[str, ...] = ()

    def __init__(self, tokenizer, args: DataOptions):
        self.tok = tokenizer
        self.args = args
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        probe_with = tokenizer("a", add_special_tokens=True)["input_ids"]
        probe_without = tokenizer("a", add_special_tokens=False)["input_ids"]
        # "Add BOS once where the tokenizer uses one": only if the tokenizer itself would add it.
        self.add_bos = self.bos is not None and probe_with[:1] == [self.bos] and probe_without[:1] != [self.bos]
        if self.eos is None:
            raise UserError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
        self._probe_head: str | None = None  # PROBE rendered with the generation prompt, on first use

    def normalise(self, batch: dict, i: int):
        raise NotImplementedError

    def _chat(self, messages: list, add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _render(self, kind, prompt, completions):
        """([prompt text, prompt + completion text, ...], whether a completion was rendered apart), or a skip
        reason. Conversations: the prompt as inference renders it, then each completion's turn after it."""
        if kind == "text":
            return [prompt] + [prompt + c for c in completions], False
        head = self._chat(prompt, add_generation_prompt=True)
        texts, apart = [head], False
        for c in completions:
            whole = self._chat(prompt + c)
            if not whole.startswith(head):  # the template renders the prompt otherwise once a turn follows
                turn = self._turn(c, whole)
                if turn is None:
                    return "no_faithful_split"
                whole, apart = head + turn, True
            texts.append(whole)
        return texts, apart

    def _turn(self, completion: list, whole: str) -> str | None:
        """The completion's messages as the template renders them after a generation prompt, or None.

        They are rendered after a probe user turn (`PROBE`), and the turn is the text that follows the
        probe's own generation prompt. It is trusted only if that prompt is a prefix of the probe
        conversation, the probe's text stays out of the turn, and the row's own conversation `whole`
        ends with the same text: the template renders the turn alike after the row's prompt.
        """
        try:
            if self._probe_head is None:
                self._probe_head = self._chat(PROBE, add_generation_prompt=True)
            full = self._chat(PROBE + completion)
        except Exception:  # jinja raises its own exception types for template errors
            return None
        if not full.startswith(self._probe_head):
            return None
        turn = full[len(self._probe_head):]
        if not turn or PROBE[0]["content"] in turn or not whole.endswith(turn):
            return None
        return turn

    def _with_bos(self, ids: list[int], conversational: bool) -> list[int]:
        # A chat template renders its own BOS, or none (what apply_chat_template(tokenize=True) gives);
        # `--chat-bos tokenizer` adds the tokenizer's where the template omits it.
        add = self.add_bos and (not conversational or self.args.chat_bos == "tokenizer")
        return [self.bos] + ids if add and ids[:1] != [self.bos] else ids

    def encode(self, text: str, conversational: bool) -> list[int]:
        """A rendered text's ids with BOS by the format's rule (`_with_bos`)."""
        return self._with_bos(self.tok(text, add_special_tokens=False)["input_ids"], conversational)

    def prompt_ids(self, kind: str, prompt) -> list[int]:
        """One prompt (kind "text" or "messages") alone, as precompute tokenizes prompts: rendered with the
        generation prompt, BOS by the format's rule, cut to --max-prompt-length. What generation starts from."""
        texts, _ = self._render(kind, prompt, [])
        return self._truncate(self.encode(texts[0], kind == "messages"), [])[0]

    def _with_eos(self, ids: list[int], conversational: bool) -> list[int]:
        # A chat template closes the turn itself (with its end-of-turn token, an EOS or not): nothing is added.
        return ids if conversational or ids[-1:] == [self.eos] else ids + [self.eos]

    def _truncate(self, prompt, completions):
        a = self.args
        if a.max_prompt_length is not None and len(prompt) > a.max_prompt_length:
            n = a.max_prompt_length
            if a.truncation == "keep_start":
                prompt = prompt[:n]
            elif prompt[:1] == [self.bos] and self.bos is not None and n > 1:
                prompt = prompt[:1] + prompt[len(prompt) - (n - 1):]  # keep BOS, then the end
            else:
                prompt = prompt[len(prompt) - n:]
        if a.max_length is not None:
            room = a.max_length - len(prompt)
            if room < 1:
                return "prompt_too_long"
            completions = [c[:room] for c in completions]
        return prompt, completions

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        n = len(indices)
        wrong = batch.get("__fastdpo_wrong_type__", [False] * n)
        out = {"id": list(indices), "prompt_ids": [[] for _ in range(n)], "chosen_ids": [[] for _ in range(n)],
               "rejected_ids": [[] for _ in range(n)], "skip": [""] * n, "boundary_merge": [False] * n,
               "turn_apart": [False] * n}
        texts, kinds, where = [], [], []
        width = 1 + len(self.targets)
        for i in range(n):
            norm = "wrong_type" if wrong[i] else self.normalise(batch, i)
            if isinstance(norm, str):
                out["skip"][i] = norm
                continue
            try:
                rendered = self._render(*norm)
            except Exception:  # jinja raises its own exception types for template errors
                rendered = "chat_template_error"
            if isinstance(rendered, str):
                out["skip"][i] = rendered
                continue
            texts.extend(rendered[0])
            out["turn_apart"][i] = rendered[1]
            kinds.append(norm[0])
            where.append(i)
        if not where:
            return out
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        for j, i in enumerate(where):
            conv = kinds[j] == "messages"
            p, *fulls = (self._with_bos(list(x), conv) for x in ids[width * j: width * (j + 1)])
            k = min(_lcp(p, f) for f in fulls)
            out["boundary_merge"][i] = k < len(p)
            prompt, completions = p[:k], [self._with_eos(f[k:], conv) for f in fulls]
            if not prompt:
                out["skip"][i] = "empty_prompt"
                continue
            if not all(completions):
                out["skip"][i] = "empty_completion"
                continue
            if len(completions) == 2 and completions[0] == completions[1]:
                out["skip"][i] = "identical_after_rendering"
                continue
            cut = self._truncate(prompt, completions)
            if isinstance(cut, str):
                out["skip"][i] = cut
                continue
            prompt, completions = cut
            if len(completions) == 2 and completions[0] == completions[1]:
                out["skip"][i] = "identical_after_truncation"
                continue
            out["prompt_ids"][i] = prompt
            for column, c in zip(self.targets, completions):
                out[column][i] = c
        return out


class PairTokenizer(RowTokenizer):
    """Preference rows -> prompt_ids, chosen_ids, rejected_ids."""

    targets = ("chosen_ids", "rejected_ids")

    def __init__(self, tokenizer, args: DataOptions, has_prompt: bool):
        super().__init__(tokenizer, args)
        self.has_prompt = has_prompt

    def normalise(self, batch, i):
        a = self.args
        prompt = batch[a.prompt_column][i] if self.has_prompt else None
        norm = normalise_row(prompt, batch[a.chosen_column][i], batch[a.rejected_column][i], self.has_prompt,
                             a.assistant_marker)
        return norm if isinstance(norm, str) else (norm[0], norm[1], list(norm[2:]))


def normalise_completion(prompt, completion):
    """(kind, prompt, [completion]) for one supervised example, or a skip reason."""
    kp, kc = _classify(prompt), _classify(completion)
    if kp == "empty_text" and kc == "text":
        kp = "text"  # plain language modelling: BOS is the only context
    for k in (kp, kc):
        if k not in ("text", "messages"):
            return k
    if kp == kc == "text":
        return ("text", prompt, [completion])
    p = _messages(prompt) if kp == "messages" else [{"role": "user", "content": prompt}]
    c = _messages(completion) if kc == "messages" else [{"role": "assistant", "content": completion}]
    return ("messages", p, [c])


SFT_FORMATS = ("preference", "completion", "messages", "text")


class CompletionTokenizer(RowTokenizer):
    """Supervised rows -> prompt_ids, chosen_ids (the target completion); rejected_ids stays empty.

    Formats: `preference` (the chosen answer of a preference set), `completion` (`prompt` and
    `completion` columns), `messages` (a conversation whose last message is the target) and `text`
    (plain language modelling on the whole text).
    """

    targets = ("chosen_ids",)

    def __init__(self, tokenizer, args: DataOptions, fmt: str, has_prompt: bool, completion_column: str,
                 messages_column: str, text_column: str):
        super().__init__(tokenizer, args)
        self.fmt, self.has_prompt = fmt, has_prompt
        self.completion_column, self.messages_column, self.text_column = (completion_column, messages_column,
                                                                          text_column)

    def normalise(self, batch, i):
        a = self.args
        if self.fmt == "preference":
            if not self.has_prompt:  # implicit prompt: needs both answers to find it
                norm = normalise_row(None, batch[a.chosen_column][i], batch[a.rejected_column][i], False,
                                     a.assistant_marker)
                return norm if isinstance(norm, str) else (norm[0], norm[1], [norm[2]])
            return normalise_completion(batch[a.prompt_column][i], batch[a.chosen_column][i])
        if self.fmt == "completion":
            return normalise_completion(batch[a.prompt_column][i] if self.has_prompt else "",
                                        batch[self.completion_column][i])
        if self.fmt == "text":
            return normalise_completion("", batch[self.text_column][i])
        msgs = _messages(batch[self.messages_column][i])
        if msgs is None:
            return _classify(batch[self.messages_column][i]) if not isinstance(
                batch[self.messages_column][i], list) else "malformed_messages"
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            return "no_prompt_found"
        return ("messages", msgs[:-1], [msgs[-1:]])


def sft_format(ds, args: DataOptions, completion_column: str, messages_column: str, text_column: str) -> str:
    columns = list(ds.column_names)
    if messages_column in columns:
        return "messages"
    if completion_column in columns:
        return "completion"
    if args.chosen_column in columns:
        return "preference"
    if text_column in columns:
        return "text"
    raise UserError(f"dataset {args.dataset} has none of the columns fastdpo sft reads ({messages_column!r}, "
                    f"{completion_column!r} with {args.prompt_column!r}, {args.chosen_column!r}, or "
                    f"{text_column!r}); columns found: {', '.join(columns)}")


def tokenized_features():
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    return Features({"id": Value("int64"), "prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids,
                     "skip": Value("string"), "boundary_merge": Value("bool"), "turn_apart": Value("bool")})


def check_chat_template(ds, tokenizer, columns: list[str]) -> None:
    """Conversational data needs a chat template: say so once, up front, rather than skip every row."""
    if getattr(tokenizer, "chat_template", None):
        return
    cols = [c for c in columns if c in ds.column_names]
    for row in ds.select(range(min(len(ds), 100))):
        if any(isinstance(row.get(c), list) for c in cols):
            raise UserError("the dataset is conversational (lists of messages) but the tokenizer has no chat "
                            "template; use a chat model's tokenizer or convert the data to prompt/chosen/rejected "
                            "strings")


def tokenize_dataset(ds, tokenizer, args: DataOptions, fingerprint: str | None = None):
    """Tokenize every preference row. Returns (kept rows as a Dataset, Counter of skips by reason, stats).

    `fingerprint` (a hash of tokenizer + settings) lets `datasets` reuse the result from its cache
    when the same data is prepared again, e.g. on a resumed precompute.
    """
    has_prompt = check_columns(ds, args)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    check_chat_template(ds, tokenizer, [args.chosen_column, args.rejected_column] + (
        [args.prompt_column] if has_prompt else []))
    return _map_rows(ds, PairTokenizer(tokenizer, args, has_prompt), args, fingerprint)


def tokenize_sft_dataset(ds, tokenizer, args: DataOptions, completion_column: str = "completion",
                         messages_column: str = "messages", text_column: str = "text",
                         fingerprint: str | None = None):
    """Tokenize supervised examples (see `CompletionTokenizer`); the target lands in `chosen_ids`."""
    fmt = sft_format(ds, args, completion_column, messages_column, text_column)
    has_prompt = args.prompt_column in ds.column_names
    if fmt == "preference":
        check_columns(ds, args)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    check_chat_template(ds, tokenizer, [args.prompt_column, args.chosen_column, completion_column, messages_column])
    fn = CompletionTokenizer(tokenizer, args, fmt, has_prompt, completion_column, messages_column, text_column)
    return _map_rows(ds, fn, args, fingerprint)


def _map_rows(ds, fn: RowTokenizer, args: DataOptions, fingerprint: str | None):
    kw = {}
    if fingerprint:
        kw["new_fingerprint"] = fingerprint
    out = ds.map(fn, batched=True, batch_size=256, with_indices=True, remove_columns=ds.column_names,
                 features=tokenized_features(), desc="Tokenizing", **kw)
    skips = collections.Counter(s for s in out["skip"] if s)
    kept_rows = [not s for s in out["skip"]]
    stats = {"rows_read": len(ds),  # and among the kept rows, those whose prompt lost a straddling token and those
             # whose completion is the assistant turn rendered on its own (`RowTokenizer._render`)
             "boundary_merges": sum(k and m for k, m in zip(kept_rows, out["boundary_merge"])),
             "turns_rendered_apart": sum(k and t for k, t in zip(kept_rows, out["turn_apart"]))}
    if skips and args.strict:
        first = next(i for i, s in enumerate(out["skip"]) if s)
        reason = out[first]["skip"]
        raise UserError(f"row {out[first]['id']} of {args.dataset}: {SKIP_REASONS[reason]} ({reason}); "
                        "--strict stops at the first skipped row")
    kept = out.filter(lambda s: not s, input_columns="skip", desc="Dropping skipped rows",
                      **({"new_fingerprint": fingerprint + "-kept"} if fingerprint else {}))
    kept = kept.remove_columns(["skip", "boundary_merge", "turn_apart"])
    return kept, skips, stats


def keep_rows(tokenized, args: DataOptions, is_main: bool = True):
    """The kept rows of `tokenize_dataset` / `tokenize_sft_dataset`'s result; prints the skip summary and
    refuses a dataset without a usable row."""
    rows, skips, stats = tokenized
    summary = summarise_skips(skips, stats["rows_read"])
    if is_main and summary:
        print(summary, file=sys.stderr)
    if len(rows) == 0:
        raise UserError(f"no usable rows in {args.dataset}: {summary or 'the split is empty'}")
    return rows


def summarise_skips(skips: collections.Counter, total: int) -> str | None:
    if not skips:
        return None
    parts = "; ".join(f"{k}={v} ({SKIP_REASONS.get(k, '?')})" for k, v in sorted(skips.items(), key=lambda kv: -kv[1]))
    return f"skipped {sum(skips.values())} of {total} rows: {parts}"
