"""`fastdpo demo`: the whole pipeline on the bundled task, on any laptop, with nothing to download.

    fastdpo demo                       # build -> sft -> precompute -> train -> eval -> compare, ~20 s on 2 CPU cores
    fastdpo demo --output /tmp/demo    # where to put models, caches, runs, plots and demo_report.json
    fastdpo demo --reduced             # fewer steps and eval rows (the test suite's version)

The task (`fastdpo.demo_task`): capitalise a 4-letter word. The SFT data is noisy: most of its
targets leave the last letter lowercase, so the SFT model makes that slip when it answers greedily.
DPO on pairs (correct answer preferred over the slip) removes it. Both are measured on held-out
words: `preference_accuracy` (implicit-reward accuracy; ties, as when the policy is the reference,
count one half) and `generation_accuracy` (greedy answers judged correct by `demo_task.judge`).
Then `fastdpo compare` gives the headline figure of a DPO workflow, the win rate of the DPO model's
answers over the SFT model's (`demo_task.judge_pair`, both orders; the SFT model against itself is
0.5 by construction: the same answers tie).

The output directory is the demo's when it holds `.fastdpo-demo.json`, which the demo writes into
a new or empty one before anything else; any other non-empty directory is refused without
`--overwrite` (the demo would write base/, sft/, dpo/, ... over what is there). One demo at a time
writes it (`io.DirLock`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from . import demo_task
from .errors import UserError
from .io import DirLock, atomic_write_json, ensure_dir, is_lock_file

JUDGE = "fastdpo.demo_task:judge"
PAIR_JUDGE = "fastdpo.demo_task:judge_pair"
MARKER = ".fastdpo-demo.json"  # what makes a directory a demo's own


class _Stages:
    """One console line per stage; what the stages print goes to OUT/demo.log."""

    def __init__(self, out: Path, total: int, live: bool):
        self.log = open(out / "demo.log", "w", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        self.total, self.n, self.live = total, 0, live

    @contextlib.contextmanager
    def stage(self, name: str, timings: dict, key: str):
        """live: the line appears when the stage starts and gets its time when it ends; else once, at the end."""
        self.n += 1
        line = f"demo {self.n}/{self.total}: {name} ..."
        if self.live:
            print(line, end="", file=sys.stderr, flush=True)
        t = time.perf_counter()
        with contextlib.redirect_stderr(self.log):
            yield
        timings[key] = time.perf_counter() - t
        print(("" if self.live else line) + f" {timings[key]:.1f} s", file=sys.stderr, flush=True)

    def finish(self):
        self.log.close()


def _summary(res: dict) -> dict:
    acc, ties = res["rewards/accuracies"], res.get("rewards/ties", 0.0)
    return {"preference_accuracy": acc + 0.5 * ties, "generation_accuracy": res.get("generation_accuracy"),
            "likelihood_accuracy": res.get("logps/accuracies"), "reward_margin": res["rewards/margins"],
            "kl_per_token": res["kl"], "num_pairs": res["num_pairs"]}


def _table(before: dict, after: dict) -> str:
    rows = [("preference_accuracy", "held-out reward accuracy (ties count 1/2)"),
            ("generation_accuracy", "greedy answers judged correct"),
            ("likelihood_accuracy", "log p(correct) > log p(slip)"),
            ("reward_margin", "mean chosen - rejected reward"),
            ("win_rate_vs_sft", "DPO's answers vs SFT's, program judge, both orders")]
    lines = [f"{'metric':<22}{'before (SFT)':>14}{'after (DPO)':>14}   meaning", "-" * 86]
    lines += [f"{k:<22}{before[k]:>14.3f}{after[k]:>14.3f}   {meaning}" for k, meaning in rows]
    return "\n".join(lines)


def _bar_chart(before: dict, after: dict, path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    from .io import atomic_write_bytes

    keys = ["preference_accuracy", "generation_accuracy", "likelihood_accuracy", "win_rate_vs_sft"]
    fig = Figure(figsize=(8.5, 3.5))
    ax = fig.subplots()
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], [before[k] for k in keys], width=0.4, label="before DPO (SFT model)")
    ax.bar([i + 0.2 for i in x], [after[k] for k in keys], width=0.4, label="after DPO")
    ax.set_xticks(list(x), [k.replace("_", " ") for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_title("fastdpo demo: held-out words, before and after DPO")
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


def claim(output: str, overwrite: bool) -> DirLock:
    """Lock the demo's directory: new, empty, a demo's own (its marker), or anything with `overwrite`."""
    from . import __version__

    out = ensure_dir(output)
    lock = DirLock(out, "demo").acquire()
    if not (out / MARKER).is_file() and not overwrite and any(not is_lock_file(p.name) for p in out.iterdir()):
        lock.release()
        raise UserError(f"--output {out} is not empty and is not a fastdpo demo's directory (it has no {MARKER}); "
                        "choose another, or pass --overwrite to write the demo's files into it")
    atomic_write_json(out / MARKER, {"fastdpo_version": __version__})
    return lock


def demo(output: str = "fastdpo-demo", reduced: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Run the demo; returns the report written to OUTPUT/demo_report.json."""
    import torch

    recipe = demo_task.REDUCED_RECIPE if reduced else demo_task.DEMO_RECIPE
    lock = claim(output, overwrite)
    threads = torch.get_num_threads()
    # a 100k-parameter model: one thread beats a thread pool, by 30x on a busy 2-core machine
    torch.set_num_threads(recipe.get("torch_threads", threads))
    try:
        return _run(Path(output), recipe, reduced, progress, overwrite)
    finally:
        torch.set_num_threads(threads)
        lock.release()


def _run(out: Path, recipe: dict, reduced: bool, progress: bool, overwrite: bool) -> dict:
    from . import modeling
    from .recipes.compare import compare
    from .recipes.eval import evaluate
    from .recipes.precompute import precompute
    from .recipes.sft import sft
    from .recipes.train import train

    modeling.set_library_progress(False)
    timings = {}
    t0 = time.perf_counter()
    stages = _Stages(out, 7, live=progress)
    try:
        with stages.stage("build a tiny model and tokenizer", timings, "build_s"):
            base = demo_task.build_model(out / "base", seed=recipe["model_seed"])
        with stages.stage("sft on the noisy demonstrations", timings, "sft_s"):
            sft(model=base, dataset=str(demo_task.data_file("sft")), output=str(out / "sft"), progress=False,
                log_every=50, overwrite=True, **recipe["sft"])
        ev = recipe["eval"]
        with stages.stage("precompute reference log-probs (train and held-out)", timings, "precompute_s"):
            for split, cache_dir in (("train", "cache-train"), ("eval", "cache-eval")):
                precompute(model=str(out / "sft"), dataset=str(demo_task.data_file(split)),
                           output=str(out / cache_dir), overwrite=True, progress=False,
                           limit=ev["limit"] if split == "eval" else None, **recipe["precompute"])
        eval_kw = dict(ref_cache=str(out / "cache-eval"), beta=recipe["dpo"]["beta"], generate=True, judge=JUDGE,
                       max_new_tokens=ev["max_new_tokens"], batch_size=64, progress=False)
        with stages.stage("evaluate the SFT model (before)", timings, "eval_before_s"):
            before = evaluate(model=str(out / "sft"), output=str(out / "eval_before.json"), **eval_kw)
        with stages.stage("DPO from the cache", timings, "dpo_s"):
            train(model=str(out / "sft"), ref_cache=str(out / "cache-train"), output=str(out / "dpo"),
                  progress=False, log_every=10, overwrite=True, **recipe["dpo"])
        with stages.stage("evaluate the DPO model (after)", timings, "eval_after_s"):
            after = evaluate(model=str(out / "dpo"), output=str(out / "eval_after.json"), **eval_kw)
        with stages.stage("compare the DPO model's answers with the SFT model's", timings, "compare_s"):
            vs = compare(model=str(out / "dpo"), baseline=str(out / "sft"), ref_cache=str(out / "cache-eval"),
                         judge=PAIR_JUDGE, max_new_tokens=ev["max_new_tokens"], batch_size=64,
                         output=str(out / "compare"), overwrite=True, progress=False)
    finally:
        stages.finish()
        modeling.set_library_progress(progress)

    b, a = _summary(before), _summary(after)
    b["win_rate_vs_sft"], a["win_rate_vs_sft"] = 0.5, vs["win_rate"]  # SFT against itself: every pair ties
    plots = []
    try:
        from .plot import plot_runs

        plots = [str(p) for p in plot_runs([out / "dpo"], out / "plots", overwrite=overwrite)]
        chart = _bar_chart(b, a, out / "plots" / "before_after.png")
        if chart:
            plots.insert(0, str(chart))
        if vs["plot"]:
            plots.append(vs["plot"])
    except UserError as e:  # matplotlib missing: the report is still written
        print(f"note: no plots ({e})", file=sys.stderr)
    timings = {k: round(v, 1) for k, v in timings.items()}
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    samples = [s for s in after.get("samples", [])[:5]]
    report = {"task": demo_task.__doc__.strip().splitlines()[0], "before": b, "after": a, "timings": timings,
              "reduced": reduced, "recipe": recipe, "plots": plots, "samples_after": samples,
              "samples_before": before.get("samples", [])[:5],
              "compare": {k: vs[k] for k in ("n", "wins", "ties", "losses", "win_rate", "ci95", "orders", "lengths")}
              | {"report": str(out / "compare" / "report.json")}}
    atomic_write_json(out / "demo_report.json", report)
    print("\n" + _table(b, a), file=sys.stderr)
    print(f"\ndemo: {timings['total_s']:.0f}s; report {out / 'demo_report.json'}; plots in {out / 'plots'}; "
          f"the stages' output in {out / 'demo.log'}", file=sys.stderr)
    print(json.dumps({"before": b, "after": a}))
    return report
