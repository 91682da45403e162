"""The data pipeline on real tokenizers and the chat templates of major model families.

Tokenizers: the SentencePiece and tekken files shipped inside the `mistral-common` wheel, loaded with
transformers as the Hub repos are (v1: Mistral 7B v0.1's 32k vocabulary, `legacy=True`; v3: Mistral 7B
v0.3's 32,768, `legacy=False`; tekken: Mistral Nemo's 131k, through transformers' tekken converter),
each with its model's official chat template. Llama 3's, Qwen2.5's, Gemma 2's and 3's and Phi-3's
templates run on the local byte-level BPE tokenizer given that family's special tokens, BOS and EOS:
what matters there is the template's structure (BOS in the template or not, how a system message is
handled, end-of-turn tokens). Nothing is downloaded.

The templates are written from the `chat_template` of each model's published tokenizer_config.json;
tool-calling branches are left out (fastdpo's rows carry no tools, so those branches never render).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
from conftest import run_cli, write_jsonl

from fastdpo import data
from fastdpo.errors import UserError

# ---------------------------------------------------------------- the templates

# Mistral-7B-Instruct-v0.1/v0.2, Mixtral-8x7B-Instruct (tokenizer v1): the system message joins the first user turn.
MISTRAL_V1 = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}"""  # noqa: E501

# Mistral-7B-Instruct-v0.3 (tokenizer v3): the system message is rendered only inside the LAST user turn (so it
# vanishes from a conversation that ends with an assistant turn), and assistant content is trimmed.
MISTRAL_V3 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""  # noqa: E501

# Mistral-Nemo-Instruct-2407 (tekken): v0.3's template without the space after [INST], the space before the answer
# and the trim.
MISTRAL_NEMO = MISTRAL_V3.replace('"[INST] "', '"[INST]"').replace('" " + message["content"]|trim + eos_token',
                                                                    'message["content"] + eos_token')

# Meta-Llama-3-8B-Instruct: BOS rendered by the template, content trimmed, <|eot_id|> ends every turn.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5-Instruct (ChatML): no BOS; a default system message when the conversation has none.
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

# gemma-2-9b-it: BOS in the template, a system message refused, content trimmed, assistant called "model".
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# gemma-3-*-it (text content; the image branch left out): the system message is prefixed to the first user turn.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# Phi-3-mini-4k-instruct: no BOS in the template, EOS after a finished conversation (given here a tokenizer that adds
# BOS to plain text, for --chat-bos).
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

# name -> (bos, eos, extra special tokens, whether the tokenizer adds BOS to plain text, template), for the local
# tokenizer given each family's tokens.
FAMILIES = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"], True, LLAMA3),
    "qwen2.5": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], False, QWEN25),
    "gemma2": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], True, GEMMA2),
    "gemma3": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], True, GEMMA3),
    "phi3": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], True, PHI3),
}
# name -> (file in mistral-common's data/, legacy, template)
MISTRAL = {
    "mistral-v1": ("tokenizer.model.v1", True, MISTRAL_V1),
    "mistral-v3": ("mistral_instruct_tokenizer_240323.model.v3", False, MISTRAL_V3),
    "mistral-nemo": ("tekken_240718.json", None, MISTRAL_NEMO),
}
TEMPLATES = list(MISTRAL) + list(FAMILIES)


def mistral_data_dir() -> str:
    mistral_common = pytest.importorskip("mistral_common")
    return os.path.join(os.path.dirname(mistral_common.__file__), "data")


def save_mistral_tokenizer(name: str, out) -> str:
    """A tokenizer directory as the model's Hub repo holds it: the SentencePiece model and a tokenizer_config.json
    with the official chat template."""
    file, legacy, template = MISTRAL[name]
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(mistral_data_dir(), file), os.path.join(out, "tokenizer.model"))
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": template}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh)
    return str(out)


def family_tokenizer(base, name: str):
    from tokenizers import processors

    bos, eos, specials, adds_bos, template = FAMILIES[name]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": [t for t in (bos, eos, *specials) if t]})
    tok.bos_token, tok.eos_token = bos, eos
    single = f"{bos} $A" if adds_bos else "$A"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(bos, tok.convert_tokens_to_ids(bos))] if adds_bos else [])
    tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def tokenizer_of(tmp_path_factory, tiny_tokenizer):
    """name -> tokenizer, each built once per session (tekken's conversion takes a few seconds)."""
    from transformers import AutoTokenizer

    built = {}

    def get(name: str):
        if name not in built:
            if name == "mistral-nemo":  # the tekken file, converted as transformers loads a native Mistral repo
                convert_tekken_tokenizer = pytest.importorskip(
                    "transformers.integrations.mistral.tokenizer", reason="needs transformers' tekken converter (5.x)"
                ).convert_tekken_tokenizer
                file, _, template = MISTRAL[name]
                built[name] = convert_tekken_tokenizer(os.path.join(mistral_data_dir(), file), chat_template=template)
            elif name in MISTRAL:
                built[name] = AutoTokenizer.from_pretrained(save_mistral_tokenizer(name, tmp_path_factory.mktemp(name)))
            else:
                built[name] = family_tokenizer(tiny_tokenizer, name)
        return built[name]

    return get


# ---------------------------------------------------------------- helpers


def tokenize(tok, rows, **kw):
    import datasets

    return data.tokenize_dataset(datasets.Dataset.from_list(rows), tok, data.DataOptions(dataset="mem", **kw))


def chat_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, **kw)["input_ids"])


def text_ids(tok, text, special=False) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


SYSTEM = "You are terse and answer in one word."
# Conversations whose every prompt message is distinct text, so that where each lands can be checked.
CONVERSATIONS = [
    ([user("Capital of Japan?")], "Tokyo.", "Kyoto."),
    ([system(SYSTEM), user("Capital of France?")], "Paris.", "Lyon."),
    ([system(SYSTEM), user("Hello there."), bot("Hi."), user("Largest planet?")], "Jupiter.", "Saturn."),
    ([user("Say hi."), bot("Hi!"), user("Now say it in French.")], " Salut !", "\n\nBonjour."),
    ([system(SYSTEM), user("Write code that adds one.")], "```python\ndef f(x):\n    return x + 1\n```", "x+1"),
    ([user("Translate 'cat' to Japanese.")], "猫 (neko) 🐱", "犬"),
    ([system(SYSTEM), user("Pick a letter.")], "a", "b"),
    ([user("End with the EOS text.")], "Done.</s>", "Done!"),
]


def conversation_rows():
    return [{"prompt": p, "chosen": [bot(c)], "rejected": [bot(r)]} for p, c, r in CONVERSATIONS]


def prompt_texts(messages) -> list[str]:
    return [m["content"].strip() for m in messages]


def check_no_prompt_text_in_completions(tok, prompt_msgs, row):
    """Every prompt message is in the cached prompt and in no completion: a user turn (or the system prompt)
    scored as part of both answers is the silent defect this pipeline must never produce."""
    prompt = tok.decode(row["prompt_ids"])
    for side in ("chosen_ids", "rejected_ids"):
        completion = tok.decode(row[side])
        for text in prompt_texts(prompt_msgs):
            assert text not in completion, (text, completion)
    for text in prompt_texts(prompt_msgs):
        assert text in prompt, (text, prompt)


# ---------------------------------------------------------------- conversations


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3", "mistral-nemo"])
def test_mistral_conversations_equal_mistral_common(tokenizer_of, name):
    """mistral-common is Mistral's own reference: its serving encoding of the prompt and its instruct encoding of
    the conversation (system prompt where its tokenizer version puts it) are the cached prompt and sequence."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = tokenizer_of(name)
    reference = MistralTokenizer.from_file(os.path.join(mistral_data_dir(), MISTRAL[name][0]))
    as_mc = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    # transformers' conversion of the SentencePiece models splits runs of spaces differently from sentencepiece
    # itself (`"    return"`), and mistral-common strips message content: these rows avoid both.
    # mistral-common also never reads a control token out of message text ("Done.</s>").
    plain = lambda text: "```" not in text and "</s>" not in text and text == text.strip()  # noqa: E731
    rows = [row for row in conversation_rows() if plain(row["chosen"][0]["content"])
            and plain(row["rejected"][0]["content"])]
    kept, skips, stats = tokenize(tok, rows)
    assert not skips and len(kept) == len(rows)
    for row, got in zip(rows, kept):
        msgs = row["prompt"]
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        turns = [as_mc[m["role"]](content=m["content"]) for m in msgs if m["role"] != "system"]
        served = reference.encode_chat_completion(ChatCompletionRequest(
            messages=([SystemMessage(content=system)] if system else []) + turns))
        assert got["prompt_ids"] == served.tokens, (tok.convert_ids_to_tokens(got["prompt_ids"]), served.text)
        for side in ("chosen", "rejected"):
            trained = reference.instruct_tokenizer.encode_instruct(InstructRequest(
                messages=turns + [AssistantMessage(content=row[side][0]["content"])], system_prompt=system))
            assert got["prompt_ids"] + got[f"{side}_ids"] == trained.tokens, (
                tok.convert_ids_to_tokens(got["prompt_ids"] + got[f"{side}_ids"]), trained.text)
    moves = name != "mistral-v1"  # v3 and Nemo render the system message in the last user turn only
    assert stats["turns_rendered_apart"] == (sum(r["prompt"][0]["role"] == "system" for r in rows) if moves else 0)


@pytest.mark.parametrize("name,turn", [("mistral-v3", " Tokyo.</s>"), ("mistral-nemo", "Tokyo.</s>")])
def test_system_prompt_stays_in_the_prompt(tokenizer_of, name, turn):
    """The issue's row: rendered whole, the conversation loses its system message; the cached prompt is what
    inference renders, and the completion is exactly the assistant turn."""
    tok = tokenizer_of(name)
    prompt = [system("You are terse."), user("Capital of Japan?")]
    whole = tok.apply_chat_template(prompt + [bot("Tokyo.")], tokenize=False)
    assert "You are terse." not in whole  # the template's behaviour this test is about
    kept, skips, stats = tokenize(tok, [{"prompt": prompt, "chosen": [bot("Tokyo.")], "rejected": [bot("Kyoto.")]}])
    row = kept[0]
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert head == "<s>[INST]" + " " * (name == "mistral-v3") + "You are terse.\n\nCapital of Japan?[/INST]"
    assert row["prompt_ids"] == chat_ids(tok, prompt, add_generation_prompt=True)
    assert row["prompt_ids"] + row["chosen_ids"] == text_ids(tok, head + turn)
    assert tok.decode(row["prompt_ids"] + row["chosen_ids"]) == head + turn
    assert row["chosen_ids"][-1] == tok.eos_token_id and row["prompt_ids"].count(tok.bos_token_id) == 1
    assert stats["turns_rendered_apart"] == 1 and not skips
    check_no_prompt_text_in_completions(tok, prompt, row)


@pytest.mark.parametrize("name", TEMPLATES)
def test_conversations_are_rendered_as_inference_renders_them(tokenizer_of, name):
    """On every template: the prompt equals apply_chat_template(prompt, add_generation_prompt=True,
    tokenize=True); where the template renders the prompt the same inside the conversation, prompt + completion
    equals apply_chat_template(prompt + answer, tokenize=True); BOS is the template's (once, or none); and no
    prompt message ever lands in a completion."""
    tok = tokenizer_of(name)
    rows = conversation_rows()
    kept, skips, stats = tokenize(tok, rows, max_length=None, max_prompt_length=None)
    refuses_system = name == "gemma2"
    expected_skips = {"chat_template_error": sum(p[0]["role"] == "system" for p, _, _ in CONVERSATIONS)} if (
        refuses_system) else {}
    assert dict(skips) == expected_skips
    bos_in_template = "bos_token" in tok.chat_template
    rendered_apart = 0
    for got in kept:
        row = rows[got["id"]]
        prompt = row["prompt"]
        assert got["prompt_ids"] == chat_ids(tok, prompt, add_generation_prompt=True)
        head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        for side in ("chosen", "rejected"):
            seq = got["prompt_ids"] + got[f"{side}_ids"]
            if tok.apply_chat_template(prompt + row[side], tokenize=False).startswith(head):
                assert seq == chat_ids(tok, prompt + row[side]), side
            else:
                rendered_apart += side == "chosen"
            assert seq.count(tok.bos_token_id) == (1 if bos_in_template else 0) or tok.bos_token_id is None
        check_no_prompt_text_in_completions(tok, prompt, got)
    assert stats["turns_rendered_apart"] == rendered_apart
    with_system = sum(p[0]["role"] == "system" for p, _, _ in CONVERSATIONS)
    assert rendered_apart == (with_system if name in ("mistral-v3", "mistral-nemo") else 0)


@pytest.mark.parametrize("name", TEMPLATES)
def test_implicit_conversations(tokenizer_of, name):
    """Only chosen/rejected conversations: the prompt is the shared messages, rendered for inference."""
    tok = tokenizer_of(name)
    shared = [user("Hello there."), bot("Hi."), user("Largest planet?")]
    row = {"chosen": shared + [bot("Jupiter.")], "rejected": shared + [bot("Saturn.")]}
    kept, skips, _ = tokenize(tok, [row])
    assert not skips
    assert kept[0]["prompt_ids"] == chat_ids(tok, shared, add_generation_prompt=True)
    assert kept[0]["prompt_ids"] + kept[0]["chosen_ids"] == chat_ids(tok, row["chosen"])
    check_no_prompt_text_in_completions(tok, shared, kept[0])


def test_trimmed_answers_that_render_alike_are_named_so(tokenizer_of):
    """v0.3's template trims assistant content: " 42" and "42" become one answer. Nothing was truncated."""
    tok = tokenizer_of("mistral-v3")
    _, skips, _ = tokenize(tok, [{"prompt": [user("6 x 7?")], "chosen": [bot(" 42")], "rejected": [bot("42")]}])
    assert skips == {"identical_after_rendering": 1}


def test_chat_bos_tokenizer_on_a_template_without_bos(tokenizer_of):
    """Phi-3's template renders no BOS, on a tokenizer that adds one to plain text: the default keeps the
    template's sequence, `--chat-bos tokenizer` puts the BOS in front, once."""
    tok = tokenizer_of("phi3")
    row = {"prompt": [user("Capital of Japan?")], "chosen": [bot("Tokyo.")], "rejected": [bot("Kyoto.")]}
    plain, _, _ = tokenize(tok, [row])
    with_bos, _, _ = tokenize(tok, [row], chat_bos="tokenizer")
    assert tok.bos_token_id not in plain[0]["prompt_ids"]
    assert with_bos[0]["prompt_ids"] == [tok.bos_token_id] + plain[0]["prompt_ids"]
    assert with_bos[0]["chosen_ids"] == plain[0]["chosen_ids"]
    # a template that renders its own BOS is never given a second one
    llama = tokenizer_of("llama3")
    kept, _, _ = tokenize(llama, [row], chat_bos="tokenizer")
    assert kept[0]["prompt_ids"] == chat_ids(llama, row["prompt"], add_generation_prompt=True)


# ---------------------------------------------------------------- no faithful split

# A template whose generation prompt opens an empty thought block that the finished conversation drops: the
# prompt alone is never a prefix of the conversation, and no turn renders after a generation prompt.
THOUGHT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think></think>' }}{% endif %}")


def test_no_faithful_split_is_a_named_skip(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = THOUGHT_TEMPLATE
    rows = [{"prompt": [user(q)], "chosen": [bot("a")], "rejected": [bot("b")]} for q in ("q1", "q2")]
    result = tokenize(tok, rows)
    assert result[1] == {"no_faithful_split": 2} and len(result[0]) == 0
    line = f"skipped 2 of 2 rows: no_faithful_split=2 ({data.SKIP_REASONS['no_faithful_split']})"
    assert data.summarise_skips(result[1], 2) == line
    with pytest.raises(UserError, match="no usable rows in mem: " + line.replace("(", r"\(").replace(")", r"\)")):
        data.keep_rows(result, data.DataOptions(dataset="mem"))
    with pytest.raises(UserError, match=r"row 0 of mem: the chat template renders the prompt differently.*"
                                        r"\(no_faithful_split\); --strict stops"):
        tokenize(tok, rows, strict=True)


# ---------------------------------------------------------------- standard, HH and ugly boundaries

# (prompt, chosen, rejected): prompts ending in a space or newline, completions with and without a leading space,
# leading newlines, unicode, code, one-character completions, a completion already ending in the EOS text.
UGLY = [
    ("Question: 2 + 2 = ", "4", "5"),
    ("Question: capital of France?\n", "Paris", "Lyon"),
    ("The capital of France is", " Paris.", "Paris."),
    ("Write a haiku.", "\n\nAn old silent pond", "\nA frog jumps"),
    ("Translate: cat ->", " 猫 ねこ", " 🐱 chat"),
    ("def add_one(x):\n", "    return x + 1\n", "\treturn x+1"),
    ("Pick a letter:", "a", "b"),
    ("Say done:", " done</s>", " finished"),
    ("Hello wor", "ld", "ds"),
]


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3", "mistral-nemo", "llama3"])
def test_standard_rows_on_real_tokenizers(tokenizer_of, name):
    """String rows keep today's rule on every tokenizer: prompt + completion tokenized as one text, BOS once where
    the tokenizer adds one, EOS appended only when missing, the straddling token scored as completion."""
    tok = tokenizer_of(name)
    eos_text = tok.eos_token
    rows = [{"prompt": p, "chosen": c.replace("</s>", eos_text), "rejected": r} for p, c, r in UGLY]
    kept, skips, _ = tokenize(tok, rows)
    assert not skips and len(kept) == len(rows)
    adds_bos = text_ids(tok, "a", special=True)[:1] == [tok.bos_token_id] != text_ids(tok, "a")[:1]
    for row, got in zip(rows, kept):
        own = text_ids(tok, row["prompt"], special=True)
        assert got["prompt_ids"] == own[:len(got["prompt_ids"])], row
        if name in MISTRAL:  # on these, at most the one straddling token moves to the completion
            assert len(got["prompt_ids"]) >= len(own) - 1, row
        for side in ("chosen", "rejected"):
            expected = text_ids(tok, row["prompt"] + row[side], special=True)
            expected += [] if expected[-1] == tok.eos_token_id else [tok.eos_token_id]
            seq = got["prompt_ids"] + got[f"{side}_ids"]
            assert seq == expected, (row, side, tok.convert_ids_to_tokens(seq))
            assert seq.count(tok.eos_token_id) == 1
            if tok.bos_token_id is not None:
                assert seq.count(tok.bos_token_id) == (1 if adds_bos else 0)


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3", "mistral-nemo"])
def test_hh_rows_on_real_tokenizers(tokenizer_of, name):
    tok = tokenizer_of(name)
    shared = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of Japan?\n\nAssistant:"
    kept, skips, _ = tokenize(tok, [{"chosen": shared + " Tokyo.", "rejected": shared + " Kyoto."}])
    got = kept[0]
    assert not skips and tok.decode(got["prompt_ids"], skip_special_tokens=True).endswith("Japan?\n\nAssistant:")
    assert got["prompt_ids"] + got["chosen_ids"] == text_ids(tok, shared + " Tokyo.", special=True) + [
        tok.eos_token_id]
    assert tok.decode(got["chosen_ids"], skip_special_tokens=True).strip() == "Tokyo."


def test_pre_rendered_prompt_string_gets_bos_once(tokenizer_of):
    """A prompt already rendered with the template (`<s>[INST] ...[/INST]`) as a string: BOS stays single."""
    tok = tokenizer_of("mistral-v3")
    prompt = tok.apply_chat_template([user("Capital of Japan?")], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<s>")
    kept, _, _ = tokenize(tok, [{"prompt": prompt, "chosen": " Tokyo.", "rejected": " Kyoto."}])
    assert kept[0]["prompt_ids"] == chat_ids(tok, [user("Capital of Japan?")], add_generation_prompt=True)
    assert kept[0]["prompt_ids"].count(tok.bos_token_id) == 1


# ---------------------------------------------------------------- the real CLI


@pytest.mark.integration
def test_precompute_cli_keeps_the_system_prompt(tmp_path, tokenizer_of):
    """`fastdpo precompute` on a tiny model with Mistral v0.3's tokenizer and template: the cached prompt holds
    the system message, each completion is the assistant turn, and the manifest counts both kinds of row."""
    from fastdpo import cache
    from fastdpo.tiny import build_tiny_model

    tok = tokenizer_of("mistral-v3")
    model = build_tiny_model(tmp_path / "model", tokenizer=copy.deepcopy(tok), hidden_size=32, intermediate_size=64)
    rows = [{"prompt": [system("You are terse."), user(f"Capital of country {i}?")], "chosen": [bot(f"City {i}.")],
             "rejected": [bot("I do not know.")]} for i in range(3)]
    rows.append({"prompt": [user("6 x 7?")], "chosen": [bot(" 42")], "rejected": [bot("42")]})
    code, err = run_cli("precompute", "--model", model, "--dataset", write_jsonl(tmp_path / "d.jsonl", rows),
                        "--output", tmp_path / "c", "--no-progress")
    assert code == 0, err
    assert "skipped 1 of 4 rows: identical_after_rendering=1" in err
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["dataset"]["rows_skipped"] == {"identical_after_rendering": 1}
    assert manifest["dataset"]["turns_rendered_apart"] == 3
    table = cache.read_shard(tmp_path / "c" / manifest["shards"][0]["file"]).to_pylist()
    assert [r["id"] for r in table] == [0, 1, 2]
    for r in table:
        i = r["id"]
        assert tok.decode(r["prompt_ids"]) == f"<s>[INST] You are terse.\n\nCapital of country {i}?[/INST]"
        assert tok.decode(r["chosen_ids"]) == f"City {i}.</s>" and tok.decode(r["rejected_ids"]) == "I do not know.</s>"
        assert len(r["ref_chosen_token_logps"]) == len(r["chosen_ids"])


# ---------------------------------------------------------------- the README's comparison with TRL


def test_trl_differences_stated_in_the_readme(tokenizer_of):
    """What TRL 1.16's DPOTrainer._prepare_dataset does with the rows the README's table names: the prompt cut
    at the common token prefix of the rendered prompt and conversation (`common_prefix_length`), string rows
    tokenized with the tokenizer's special tokens, implicit string prompts cut at the first differing
    character (`extract_prompt`)."""
    data_utils = pytest.importorskip("trl.data_utils")
    tok = tokenizer_of("mistral-v3")
    prompt, answer = [system("You are terse."), user("Capital of Japan?")], [bot("Tokyo.")]
    p, pc = chat_ids(tok, prompt, add_generation_prompt=True), chat_ids(tok, prompt + answer)
    k = data_utils.common_prefix_length(p, pc)
    assert tok.decode(p[:k]) == "<s>[INST]" and tok.decode(pc[k:]) == "Capital of Japan?[/INST] Tokyo.</s>"
    kept, _, _ = tokenize(tok, [{"prompt": prompt, "chosen": answer, "rejected": [bot("Kyoto.")]}])
    assert tok.decode(kept[0]["chosen_ids"]) == "Tokyo.</s>"  # fastdpo: the system prompt stays in the prompt

    rendered = tok.apply_chat_template([user("Hi")], tokenize=False, add_generation_prompt=True)
    assert text_ids(tok, rendered, special=True)[:2] == [tok.bos_token_id] * 2  # TRL's string path: BOS twice
    kept, _, _ = tokenize(tok, [{"prompt": rendered, "chosen": " Hello.", "rejected": " Bye."}])
    assert kept[0]["prompt_ids"].count(tok.bos_token_id) == 1

    hh = "\n\nHuman: Name a pet.\n\nAssistant: The "
    trl = data_utils.extract_prompt({"chosen": hh + "cat", "rejected": hh + "dog"})
    assert trl == {"prompt": hh.rstrip(" "), "chosen": " cat", "rejected": " dog"}  # "The" is in TRL's prompt
    kept, _, _ = tokenize(tok, [{"chosen": hh + "cat", "rejected": hh + "dog"}])
    assert tok.decode(kept[0]["chosen_ids"], skip_special_tokens=True).strip() == "The cat"
