"""Configs validate themselves: flags, config files and the Python API are checked alike, before anything loads."""

from __future__ import annotations

import json
import math

import pytest
from conftest import one_line_error, run_cli

import fastdpo
from fastdpo.config import build_config
from fastdpo.errors import UserError
from fastdpo.recipes.train import TrainConfig

MISSING_MODEL = "/nonexistent/model"  # never loaded: every case below must fail before any model loads


def _one_line(code, err, *needles):
    return one_line_error(code, err, *needles, alone=True)  # refused before anything loads or prints


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("key,value,allowed", [
    ("optimizer", "adam", "adamw, sgd"),
    ("optimizer", "SGD", "adamw, sgd"),
    ("lr_scheduler", "cosine_restarts", "constant, linear, cosine"),
    ("truncation", "middle", "keep_end, keep_start"),
    ("report_to", "mlflow", "none, tensorboard, wandb"),
    ("logps_backend", "cuda", "auto, triton, torch, eager"),
    ("dtype", "fp8", "auto, float32, bfloat16, float16, bf16-mixed"),
])
def test_invalid_choice_in_yaml_names_key_and_choices(tmp_path, key, value, allowed):
    config = _yaml(tmp_path, f"model: {MISSING_MODEL}\nref_cache: {tmp_path}/c\noutput: {tmp_path}/r\n{key}: {value}\n")
    line = _one_line(*run_cli("train", "--config", config), key, repr(value), allowed, str(config))
    assert "not one of" in line
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.parametrize("key,value,allowed", [("optimizer", "adam", "adamw, sgd"),
                                               ("truncation", "middle", "keep_end, keep_start")])
def test_invalid_choice_through_the_python_api(tmp_path, key, value, allowed):
    with pytest.raises(UserError) as e:
        fastdpo.train(model=MISSING_MODEL, ref_cache=str(tmp_path / "c"), output=str(tmp_path / "r"), **{key: value})
    assert e.value.exit_code == 2 and key in str(e.value) and allowed in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--max-grad-norm", "nan", "finite"),
    ("--max-grad-norm", "-1", "at least 0"),
    ("--weight-decay", "-0.1", "at least 0"),
    ("--weight-decay", "nan", "finite"),
    ("--momentum", "-1", "at least 0"),
    ("--seed", "-1", "at least 0"),
    ("--seed", str(2**32), "at most"),
    ("--lr", "0", "greater than 0"),
    ("--lr", "inf", "finite"),
    ("--early-stop-kl", "-1", "greater than 0"),
    ("--lora-alpha", "nan", "finite"),
    ("--lora-dropout", "2", "--lora-dropout"),
    ("--warmup-ratio", "1", "less than 1"),
    ("--batch-size", "0", "at least 1"),
    ("--beta", "0.1,-2", "greater than 0"),
    ("--loss-weights", "1,-1", "at least 0"),
    ("--ld-alpha", "1.5", "at most 1"),
    ("--dtype", "float16", "loss scaling"),
])
def test_numeric_ranges_are_checked_up_front(tmp_path, flag, value, needle):
    code, err = run_cli("train", "--model", MISSING_MODEL, "--ref-cache", tmp_path / "c", "--output",
                        tmp_path / "r", flag, value)
    _one_line(code, err, flag.lstrip("-").split("-")[0], needle)
    assert not (tmp_path / "r").exists()


def test_same_check_for_flags_files_and_api(tmp_path):
    """One rule, three ways in: the message names the flag, the file's key, or the keyword."""
    base = dict(model=MISSING_MODEL, ref_cache=str(tmp_path / "c"), output=str(tmp_path / "r"))
    flag = _one_line(*run_cli("train", *sum(([f"--{k.replace('_', '-')}", v] for k, v in base.items()), []),
                              "--momentum", "-1"))
    config = _yaml(tmp_path, "".join(f"{k}: {v}\n" for k, v in base.items()) + "momentum: -1\n")
    file = _one_line(*run_cli("train", "--config", config))
    with pytest.raises(UserError, match="momentum must be at least 0") as api:
        TrainConfig(**base, momentum=-1.0)
    assert "--momentum must be at least 0 and less than 1, got -1.0" in flag
    assert f"{config}: momentum must be at least 0 and less than 1, got -1" in file
    assert str(api.value).startswith("momentum must be at least 0 and less than 1")


def test_lists_come_from_config_files(tmp_path):
    """Loss mixtures and beta sweeps are typed in the dataclass: a YAML list or a comma string both work."""
    base = dict(model=MISSING_MODEL, ref_cache="c", output="r")
    cfg = build_config(TrainConfig, {**base, "loss": ["sigmoid", "sft"], "loss_weights": "1, 0.2",
                                     "beta": [0.05, 0.1]})
    assert cfg.loss == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.2] and cfg.beta == [0.05, 0.1]
    assert build_config(TrainConfig, {**base, "beta": "0.3"}).beta == 0.3  # one value: one run
    assert build_config(TrainConfig, {**base, "beta": [0.3]}).beta == 0.3
    with pytest.raises(UserError, match="loss_weights must be a number, got 'x'"):
        build_config(TrainConfig, {**base, "loss": "sigmoid,sft", "loss_weights": "1,x"})
    with pytest.raises(UserError, match="unknown loss type 'sigmod' .did you mean sigmoid"):
        build_config(TrainConfig, {**base, "loss": "sigmod"})


def test_yaml_numbers_written_as_strings_are_numbers(tmp_path):
    """YAML reads `1e-5` as a string; such a value is a number where the field is one."""
    cfg = build_config(TrainConfig, {"model": MISSING_MODEL, "ref_cache": "c", "output": "r", "lr": "1e-5"})
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    with pytest.raises(UserError, match="lr must be a number, got 'fast'"):
        build_config(TrainConfig, {"model": MISSING_MODEL, "ref_cache": "c", "output": "r", "lr": "fast"})


def test_config_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model: \xff\xfe\n")
    _one_line(*run_cli("train", "--config", bad), "not UTF-8", str(bad))
    not_a_map = _yaml(tmp_path, "- a\n- b\n")
    _one_line(*run_cli("train", "--config", not_a_map), "mapping")
    unknown = _yaml(tmp_path, "model: m\nbogus_key: 1\n")
    _one_line(*run_cli("train", "--config", unknown), "unknown option(s) bogus_key")
    _one_line(*run_cli("train", "--config", tmp_path / "absent.yaml"), "config file not found")
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"model": MISSING_MODEL, "ref_cache": "c", "output": "r", "shuffle": "yes"}))
    _one_line(*run_cli("train", "--config", typed), "shuffle must be true or false")


def test_a_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path):
    """PyYAML and json keep the last of two equal keys: the first value would vanish without a word."""
    twice = _yaml(tmp_path, f"model: {MISSING_MODEL}\nlr: 1e-5\nref_cache: c\nlr: 2e-5\n")
    _one_line(*run_cli("train", "--config", twice), f"config file {twice}: lr is given twice (lines 2 and 4)")
    spelled = _yaml(tmp_path, f"model: {MISSING_MODEL}\nmax-steps: 3\nmax_steps: 4\n")  # one option, two spellings
    _one_line(*run_cli("train", "--config", spelled), "max_steps is given twice (lines 2 and 3)")
    as_json = tmp_path / "run.json"
    as_json.write_text(f'{{"model": "{MISSING_MODEL}",\n "beta": 0.1,\n "output": "r",\n "beta": 0.5}}\n')
    _one_line(*run_cli("train", "--config", as_json), f"config file {as_json}: beta is given twice (lines 2 and 4)")
    merged = _yaml(tmp_path, "base: &b\n  lr: 1e-5\nrun:\n  <<: *b\n  lr: 2e-5\n")  # YAML merge: an override
    from fastdpo.config import load_config_file

    assert load_config_file(str(merged))["run"] == {"lr": "2e-5"}  # (YAML 1.1 reads 2e-5 as a string)


def test_a_loss_or_a_sweep_value_given_twice_is_refused_before_anything_trains(tmp_path):
    args = ("train", "--model", MISSING_MODEL, "--ref-cache", "c", "--output", tmp_path / "r")
    _one_line(*run_cli(*args, "--loss", "sigmoid,sigmoid"), "--loss names sigmoid twice", "--loss-weights")
    _one_line(*run_cli(*args, "--loss", "sigmoid,sft,sigmoid", "--loss-weights", "1,1,1"), "names sigmoid twice")
    _one_line(*run_cli(*args, "--beta", "0.1,0.1"), "--beta lists 0.1 twice")
    _one_line(*run_cli(*args, "--beta", "0.1,0.5,0.1000000001"), "--beta lists 0.1 twice")  # one OUT/beta-0.1
    assert not (tmp_path / "r").exists()


def test_a_sweep_checks_every_run_directory_before_the_first_trains(tiny_model, small_cache, tmp_path):
    taken = tmp_path / "s" / "beta-0.5"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    one_line_error(*run_cli("train", "--model", tiny_model, "--ref-cache", small_cache, "--output", tmp_path / "s",
                            "--beta", "0.1,0.5", "--max-steps", "1", "--no-progress"),
                   f"--output {taken} is not empty and holds no fastdpo run")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["beta-0.5"]


def test_required_and_cross_field_rules(tmp_path):
    _one_line(*run_cli("train", "--ref-cache", "c", "--output", tmp_path / "r"), "missing required option --model")
    _one_line(*run_cli("train", "--model", MISSING_MODEL, "--output", tmp_path / "r"), "--ref-cache")
    _one_line(*run_cli("train", "--model", MISSING_MODEL, "--ref-cache", "c", "--output", tmp_path / "r",
                       "--limit", "5"), "--limit has no effect with --ref-cache")
    _one_line(*run_cli("precompute", "--model", MISSING_MODEL, "--dataset", "d.jsonl", "--output", tmp_path / "c",
                       "--dtype", "bf16-mixed"), "training mode")
    _one_line(*run_cli("eval", "--model", MISSING_MODEL, "--ref-cache", "c", "--judge", "m:f"), "add --generate")
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_help_lists_every_field_in_groups():
    import dataclasses

    from fastdpo.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    flags = {s for a in sub._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags
    titles = [g.title for g in sub._action_groups]
    assert titles.index("policy model") < titles.index("loss") < titles.index("LoRA (pip install 'fastdpo[peft]')")
    assert math.isfinite(TrainConfig(model="m", ref_cache="c", output="o").lr)


def _command_configs():
    from fastdpo.cli import cache as cache_cli
    from fastdpo.cli import demo as demo_cli
    from fastdpo.plan import PlanConfig
    from fastdpo.plot import PlotConfig
    from fastdpo.recipes.compare import CompareConfig
    from fastdpo.recipes.eval import EvalConfig
    from fastdpo.recipes.precompute import PrecomputeConfig
    from fastdpo.recipes.sft import SFTConfig

    return [TrainConfig, SFTConfig, PrecomputeConfig, EvalConfig, CompareConfig, PlotConfig, PlanConfig,
            demo_cli.CONFIG, cache_cli.InfoConfig, cache_cli.VerifyConfig]


@pytest.mark.parametrize("cls", _command_configs(), ids=lambda c: c.__name__)
def test_each_command_config_is_one_flat_dataclass_declared_in_its_module(cls):
    """No base class: every field, with its default and help, is written out in the command's own class, and its
    one validation function is its own `__post_init__`."""
    import dataclasses
    import inspect

    assert cls.__bases__ == (object,)
    assert not any(dataclasses.is_dataclass(base) for base in cls.__mro__[1:])
    declared = vars(cls)["__annotations__"]  # the class body's own annotations, not inherited ones
    fields = vars(cls)["__dataclass_fields__"]
    assert list(fields) == list(declared)
    assert all(f.metadata.get("help") for f in fields.values())  # each field carries its flag's help text
    assert "__post_init__" in vars(cls) and "check" not in vars(cls)
    source = inspect.getsource(cls)
    for name in fields:
        assert f"\n    {name}: " in source  # written out in this class body, in its module
    assert inspect.getmodule(cls).__name__ == cls.__module__


def _spec(cls, name):
    import dataclasses
    import typing

    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return typing.get_type_hints(cls)[name], default, dict(f.metadata)


def test_copied_options_are_equal_in_every_command():
    """Copying a field instead of inheriting it must not let the copies drift: an option shared by several commands
    has the same type, default, help, choices, bounds and group in each (sft's --lr default is its own)."""
    import dataclasses

    from fastdpo import data
    from fastdpo.plan import PlanConfig
    from fastdpo.recipes.compare import CompareConfig
    from fastdpo.recipes.eval import EvalConfig
    from fastdpo.recipes.precompute import PrecomputeConfig
    from fastdpo.recipes.sft import SFTConfig

    model = ["revision", "dtype", "trust_remote_code", "attn_implementation", "logps_backend"]
    data_options = [n for n in data.DATA_OPTIONS if n != "dataset"]  # train's --dataset is optional (or a cache)
    run = [f.name for f in dataclasses.fields(SFTConfig)
           if f.name not in (*data.DATA_OPTIONS, "lr", "completion_column", "messages_column", "text_column")]
    families = [  # (options, the commands that copy them)
        (model, [TrainConfig, SFTConfig, PrecomputeConfig, EvalConfig, CompareConfig]),
        (["model"], [TrainConfig, SFTConfig, PrecomputeConfig, EvalConfig]),  # compare's is "model A"
        (["packing", "prefix_sharing", "max_tokens_per_batch"], [TrainConfig, PrecomputeConfig, EvalConfig]),
        (["device", "batch_size", "progress"], [PrecomputeConfig, EvalConfig]),
        (run, [TrainConfig, SFTConfig]),
        (data_options, [TrainConfig, SFTConfig, PrecomputeConfig]),
        (["dataset"], [SFTConfig, PrecomputeConfig]),
        (["load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_double_quant", "bnb_4bit_compute_dtype"],
         [TrainConfig, SFTConfig, PrecomputeConfig, EvalConfig, CompareConfig, PlanConfig]),
    ]
    for names, classes in families:
        for name in names:
            first, *others = classes
            for cls in others:
                assert _spec(cls, name) == _spec(first, name), f"{cls.__name__}.{name} differs from {first.__name__}'s"
    assert len(run) > 30  # the whole run family: model, output, optimisation, logging, distributed, LoRA
    for cls in (TrainConfig, SFTConfig, PrecomputeConfig):  # as data's functions read them without a command
        for f in dataclasses.fields(data.DataOptions):
            assert _spec(cls, f.name)[1] == f.default, f"{cls.__name__}.{f.name}"


SFT_LR = 2e-5


def test_sft_has_its_own_lr_default_and_train_its_data_rule():
    from fastdpo.recipes.sft import SFTConfig

    assert SFTConfig(model="m", dataset="d", output="o").lr == SFT_LR
    assert TrainConfig(model="m", ref_cache="c", output="o").lr == 1e-6
    with pytest.raises(UserError, match="--chat-bos has no effect with --ref-cache"):
        TrainConfig(model="m", ref_cache="c", output="o", chat_bos="tokenizer")
    with pytest.raises(UserError, match="--merge-lora needs --lora-r"):  # the shared run rule, called by sft too
        SFTConfig(model="m", dataset="d", output="o", merge_lora=True)
