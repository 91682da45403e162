"""Preference statistics (rewards, accuracies, margins, KL estimates), the step log line, memory, MFU.

Train and eval compute their numbers here, from the same per-pair and per-token values:

    rewards/chosen, rewards/rejected   implicit rewards (losses.preference_loss: beta x (policy - reference))
    rewards/accuracies, rewards/ties   fraction of pairs with chosen reward >, = rejected reward (TRL's)
    rewards/margins                    mean chosen - rejected reward
    logps/chosen, logps/rejected       mean policy log-prob of each completion
    logps/accuracies                   fraction of pairs whose chosen answer is more likely
    kl                                 per-token estimate of KL(policy || reference) on the completions, which
                                       stand in for samples of the reference: importance-weighted,
                                       E_ref[(p/q) log(p/q)] = KL(p || q), so w r with r = log p - log q and
                                       w = exp(r) (r clamped to +-20). Tokens the policy pushed down (the
                                       rejected answers) weigh little, as they do in the policy's own samples
    kl/k1, kl/k3                       the unweighted per-token estimators (Schulman 2020: k1 = r,
                                       k3 = exp(-r) - 1 + r); dominated by pushed-down tokens, so read them as
                                       drift indicators
    kl/sequence                        mean summed log-ratio per completion

`preference_sums` returns sums over a micro-batch; the loop adds them over micro-batches and
processes, and `preference_means` turns them into the means above.
"""

from __future__ import annotations

# Peak dense bf16 tensor FLOP/s by GPU name (no sparsity), for MFU; first match wins.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12)]


def preference_sums(losses, policy_c, policy_r, ref_c, ref_r, rewards_c, rewards_r,
                    token_sides=None) -> dict:
    """Sums over a micro-batch's pairs (all (B,)); with `token_sides` (see `kl_sums`), the per-token KL sums.
    `losses` may be None (evaluation)."""
    t = lambda x: x.detach().sum()  # noqa: E731
    out = {} if losses is None else {"loss": t(losses)}
    out.update({"rewards/chosen": t(rewards_c), "rewards/rejected": t(rewards_r),
                "rewards/accuracies": t((rewards_c > rewards_r).float()),
                "rewards/ties": t((rewards_c == rewards_r).float()), "rewards/margins": t(rewards_c - rewards_r),
                "logps/chosen": t(policy_c), "logps/rejected": t(policy_r),
                "logps/accuracies": t((policy_c > policy_r).float())})
    if ref_c is not None:
        out["kl/sequence"] = t(policy_c - ref_c) + t(policy_r - ref_r)
    if token_sides is not None:
        out.update(kl_sums(token_sides))
    return out


def kl_sums(token_sides) -> dict:
    """Per-token KL estimator sums, and their token count (see the module docstring).

    token_sides: [(policy (B, T), reference (B, T), mask (B, T)), ...], e.g. the chosen and rejected sides.
    """
    import torch

    kl = k1 = k3 = 0.0
    count = 0
    for tok, ref, mask in token_sides:
        r = (tok.detach().double() - ref.double()) * mask
        clamped = r.clamp(-20, 20)
        kl = kl + (clamped.exp() * clamped).sum()
        k1 = k1 + r.sum()
        k3 = k3 + ((torch.expm1(-r) + r) * mask).sum()
        count = count + mask.sum()
    return {"kl": kl, "kl/k1": k1, "kl/k3": k3, "kl_tokens": count}


def preference_means(sums: dict[str, float], pairs: float) -> dict[str, float]:
    """Means from `preference_sums` added up over `pairs` pairs: per pair; per token for the KL estimates,
    per completion for kl/sequence."""
    pairs = max(pairs, 1.0)
    out = {k: v / pairs for k, v in sums.items() if not k.startswith("kl")}
    if "kl_tokens" in sums:
        out.update({k: sums[k] / max(sums["kl_tokens"], 1.0) for k in ("kl", "kl/k1", "kl/k3")})
    if "kl/sequence" in sums:
        out["kl/sequence"] = sums["kl/sequence"] / (2 * pairs)
    return out


def peak_memory_gb(device) -> float:
    """Peak CUDA memory allocated since the last `reset_peak_memory`, or the process's peak RSS on CPU."""
    import torch

    if getattr(device, "type", "") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gb()


def peak_rss_gb() -> float:
    """This process's peak resident memory. On Linux /proc's VmHWM, the peak of this program's own memory: not
    getrusage's ru_maxrss, which Linux keeps across execve, so that a process started by a large one (a test
    runner, a notebook) reports at least its parent's size at the fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def reset_peak_memory(device) -> None:
    import torch

    if getattr(device, "type", "") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_flops(device) -> float | None:
    """The device's peak bf16 FLOP/s (None on CPU or an unknown GPU: no MFU then)."""
    import torch

    if getattr(device, "type", "") != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


def mfu(n_params: int, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: 6 N FLOPs per token through forward and backward (attention not counted)."""
    return None if not peak else 6 * n_params * tokens_per_s / peak


def format_line(m: dict, total_steps: int, unit: str = "pairs") -> str:
    """One console line per logged step, nanoGPT style."""
    parts = [f"step {m['step']}/{total_steps}", f"loss {m['loss']:.4f}"]
    if "rewards/accuracies" in m:
        parts += [f"acc {m['rewards/accuracies']:.3f}", f"margin {m['rewards/margins']:.4f}"]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    parts += [f"grad {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}", f"{m['step_s'] * 1000:.0f} ms",
              f"{m['samples_per_s']:.1f} {unit}/s", f"{m['tokens_per_s']:.0f} tok/s"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    parts.append(f"{m['peak_memory_gb']:.2f} GB")
    return " | ".join(parts)
