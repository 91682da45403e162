"""The judges of `fastdpo compare`, behind one interface. Each is built from the command's config and checked
then (imported; config and tokenizer read), before any model answers; `load()` brings its weights, after both
models have answered, so that one model at a time is in memory; `close()` lets them go.

- pairwise judges (`pairwise = True`): `prefer(prompts, first, second, ids)` -> per pair
  {"p_first": P(the first-shown answer is better), "raw": what the judge said};
- the reward model (`pairwise = False`): `score(prompts, answers)` -> one reward per answer.

`judge_batch` asks a pairwise judge both orders and turns two rewards into P(A better) = sigmoid(r_A - r_B);
`fastdpo.recipes.compare` makes the verdicts from those probabilities.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import types

from . import modeling
from .errors import UserError, first_line

# The LLM judge's prompt. With a chat template it is the user's message and the label ("A" or "B") is the
# first token of the reply; without one, "\nAnswer:" follows and the labels are " A" and " B".
LLM_JUDGE_TEMPLATE = """You are comparing two responses to the same prompt. Decide which response answers it better: \
more helpful, more correct, clearer. Reply with one letter, A or B.

[Prompt]
{prompt}

[Response A]
{answer_a}

[Response B]
{answer_b}

Which response is better, A or B?"""


def _as_probability(value, spec: str, row_id) -> float:
    if isinstance(value, str) and value in ("a", "b", "tie"):
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[value]
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    raise UserError(f"--judge {spec} returned {value!r} for prompt id {row_id}; a pairwise judge returns 'a', 'b', "
                    "'tie' or a float in [0, 1] (the probability that answer_a is better)")


class ProgramJudge:
    """`module:function(prompt, answer_a, answer_b)`, imported and its signature checked on construction."""

    pairwise = True

    def __init__(self, cfg):
        from .recipes.eval import load_judge

        self.spec = cfg.judge
        self.fn = load_judge(cfg.judge, ("prompt", "answer_a", "answer_b"))
        try:  # known by its code too: an edited judge does not reuse the old one's judgements
            code = hashlib.sha256(inspect.getsource(self.fn).encode()).hexdigest()
        except (OSError, TypeError):
            code = None
        self._settings = {"judge": self.spec, "source_sha256": code}

    def settings(self) -> dict:
        return self._settings

    def load(self):
        pass

    def prefer(self, prompts, first, second, ids) -> list[dict]:
        out = []
        for prompt, a, b, row_id in zip(prompts, first, second, ids):
            try:
                value = self.fn(prompt, a, b)
            except Exception as e:  # the user's code: name it and the prompt, not our traceback
                raise UserError(f"--judge {self.spec} raised {type(e).__name__} on prompt id {row_id}: "
                                f"{first_line(e)}") from None
            p = _as_probability(value, self.spec, row_id)
            out.append({"p_first": p, "raw": value if isinstance(value, str) else p})
        return out

    def close(self):
        pass


def _conversation(prompt, answer: str | None = None) -> list[dict]:
    msgs = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _prompt_text(prompt) -> str:
    """A prompt as text for the LLM judge's template: messages become `role: content` lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return prompt


class RewardModelJudge:
    """An `AutoModelForSequenceClassification`; its config and tokenizer are checked on construction, the weights
    load in `load()` (after both models have answered, so at most one model is in memory at a time)."""

    pairwise = False

    def __init__(self, cfg, device, dtype):
        self.cfg, self.device, self.dtype, self.name = cfg, device, dtype, cfg.reward_model
        config = modeling.load_config(self.name, trust_remote_code=cfg.trust_remote_code)
        archs = list(getattr(config, "architectures", None) or [])
        if archs and all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise UserError(f"--reward-model {self.name} is a {archs[0]}, a language model without a reward head; "
                            "give a sequence-classification reward model, or use it as --llm-judge")
        n = config.num_labels
        if n > 1 and cfg.reward_index is None:
            labels = ", ".join(f"{i}: {v}" for i, v in sorted((getattr(config, "id2label", None) or {}).items()))
            raise UserError(f"--reward-model {self.name} has {n} output labels ({labels}); give --reward-index I "
                            "for the one that is the reward")
        if cfg.reward_index is not None and cfg.reward_index >= n:
            raise UserError(f"--reward-index {cfg.reward_index}: --reward-model {self.name} has {n} output label(s) "
                            f"(0 to {n - 1})")
        self.index = cfg.reward_index or 0
        self.tokenizer = modeling.load_tokenizer(self.name, trust_remote_code=cfg.trust_remote_code)
        self.model = None
        self._settings = {"reward_model": self.name, "reward_index": cfg.reward_index, "dtype": str(dtype),
                          "weights": modeling.weights_hash(self.name)}

    def settings(self) -> dict:
        return self._settings

    def load(self):
        import transformers
        from transformers import AutoModelForSequenceClassification

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": self.dtype,
              "trust_remote_code": self.cfg.trust_remote_code, "output_loading_info": True}
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(self.name, **kw)
        except Exception as e:
            raise UserError(f"cannot load --reward-model {self.name}: {first_line(e)}") from None
        if info.get("missing_keys"):  # transformers would score with a freshly initialised head
            raise UserError(f"--reward-model {self.name} has no trained reward head (missing: "
                            f"{', '.join(sorted(info['missing_keys'])[:3])}); give a reward model")
        if model.config.pad_token_id is None:  # it pools the last non-padding token of each row
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()

    def _texts(self, prompts, answers) -> tuple[list[str], bool]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template(_conversation(p, a), tokenize=False) for p, a in zip(prompts, answers)]
            return texts, False
        return [_prompt_text(p) + a for p, a in zip(prompts, answers)], True

    def score(self, prompts, answers) -> list[float]:
        """The reward of each answer after its prompt, in batches of --batch-size."""
        import torch

        texts, special = self._texts(prompts, answers)
        out = []
        for lo in range(0, len(texts), self.cfg.batch_size):
            enc = self.tokenizer(texts[lo:lo + self.cfg.batch_size], padding=True, return_tensors="pt",
                                 add_special_tokens=special)
            with torch.no_grad():
                logits = self.model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device)).logits  # (B, labels)
            out += logits[:, self.index].float().cpu().tolist()
        return out

    def close(self):
        self.model = None


class LLMJudge:
    """A causal LM asked `LLM_JUDGE_TEMPLATE`; the two labels are scored as two completions of the same prompt
    (`scoring.score_rows`, prefix-shared where exact), so the choice is read from log-probs, never parsed."""

    pairwise = True

    def __init__(self, cfg, device, dtype):
        from .data import RowTokenizer
        from .scoring import prepare

        self.cfg, self.device, self.name = cfg, device, cfg.llm_judge
        self.args = modeling.ModelSpec(model=cfg.llm_judge, trust_remote_code=cfg.trust_remote_code,
                                       logps_backend=cfg.logps_backend)
        self.setup = prepare(self.args, device, dtype)
        tok = self.setup.tokenizer
        self.chat = bool(getattr(tok, "chat_template", None))
        self.labels = ("A", "B") if self.chat else (" A", " B")
        self.rows = RowTokenizer(tok, types.SimpleNamespace(chat_bos="template"))  # BOS by the format's rule
        self.scorer = None
        self._settings = {"llm_judge": self.name, "dtype": str(dtype), "logps_backend": cfg.logps_backend,
                          "weights": modeling.weights_hash(self.name), "template": LLM_JUDGE_TEMPLATE}

    def settings(self) -> dict:
        return self._settings

    def load(self):
        self.scorer = self.setup.scorer(self.setup.load(device=self.device).eval())
        self.setup.print_notes()

    def inputs(self, prompt, first: str, second: str) -> tuple[list[int], list[int], list[int]]:
        """(judge prompt ids, label A ids, label B ids): each label tokenized with the prompt as one text and split
        off at their longest shared token prefix, as `fastdpo.data` splits prompt and completion."""
        from .data import _lcp

        tok = self.setup.tokenizer
        text = LLM_JUDGE_TEMPLATE.format(prompt=_prompt_text(prompt), answer_a=first, answer_b=second)
        if self.chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text += "\nAnswer:"
        p, *fulls = (self.rows.encode(t, self.chat) for t in [text] + [text + label for label in self.labels])
        k = min(_lcp(p, f) for f in fulls)
        return p[:k], fulls[0][k:], fulls[1][k:]

    def prefer(self, prompts, first, second, ids) -> list[dict]:
        import numpy as np

        from .scoring import score_rows

        rows = [self.inputs(p, a, b) for p, a, b in zip(prompts, first, second)]
        tok_a, tok_b = score_rows(self.scorer, *(list(x) for x in zip(*rows)), self.cfg.batch_size, self.setup.layout,
                                  self.setup.tokenizer.pad_token_id, self.device)
        out = []
        for ta, tb in zip(tok_a, tok_b):
            lp_a, lp_b = float(np.sum(ta, dtype=np.float64)), float(np.sum(tb, dtype=np.float64))
            out.append({"p_first": 1 / (1 + math.exp(min(lp_b - lp_a, 700.0))), "raw": {"logp_a": lp_a,
                                                                                       "logp_b": lp_b}})
        return out

    def close(self):
        self.scorer = None


def make_judge(cfg, device, dtype):
    """The judge the flags name, checked (imported, config and tokenizer read) before any model answers."""
    if cfg.judge:
        return ProgramJudge(cfg)
    if cfg.reward_model:
        return RewardModelJudge(cfg, device, dtype)
    return LLMJudge(cfg, device, dtype)


def judge_batch(judge, prompts, answers_a, answers_b, ids) -> list[dict]:
    """One judgement record per pair: both orders for a pairwise judge, the two rewards for a reward model."""
    if not judge.pairwise:
        r = judge.score(list(prompts) * 2, list(answers_a) + list(answers_b))
        n = len(answers_a)
        return [{"rewards": {"model": ra, "baseline": rb}, "p_model": 1 / (1 + math.exp(min(rb - ra, 700.0)))}
                for ra, rb in zip(r[:n], r[n:])]
    ab = judge.prefer(prompts, answers_a, answers_b, ids)
    ba = judge.prefer(prompts, answers_b, answers_a, ids)
    return [{"model_first": x, "baseline_first": y} for x, y in zip(ab, ba)]
