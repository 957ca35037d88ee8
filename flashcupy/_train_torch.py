"""`flashcupy train --compare-torch`: the same GPT trained in PyTorch, in the same process (issue 21).

Identical to flashcupy.train's model and run: the same initial weights (train.initial_values from the
same seed), the same batches (train.batch_offsets), the same learning-rate schedule, AdamW with the
same betas, eps, decoupled weight decay on the matrices only and global gradient-norm clipping
(torch.nn.utils.clip_grad_norm_, whose factor is flashcupy's min(1, max / (norm + 1e-6))), the same
validation windows. The PyTorch side is what a PyTorch user would write: float32 parameters, the
forward under torch.autocast in the run's attention dtype on a GPU (bf16 by default: every matmul in
bf16, not only attention as on flashcupy's tape), F.scaled_dot_product_attention(is_causal=True)
(the flash backend on a GPU), F.gelu(approximate="tanh"), fused AdamW on a GPU; eager (no
torch.compile). Timing as flashcupy.train's: the first step apart, the device synchronised every
log_every steps.
"""

from __future__ import annotations

import math
import time

import numpy as np

from . import train as _train


def _torch():
    try:
        import torch
        import torch.nn.functional  # noqa: F401
    except ImportError as e:
        from .cli import CommandError

        raise CommandError(f"--compare-torch: torch is not importable ({e})") from None
    return torch


def run_twin(cfg, train_bytes, val_bytes, on_gpu: bool) -> dict:
    """Train the PyTorch twin of cfg's model; returns its tokens/s and losses (train per step, val)."""
    torch = _torch()
    F = torch.nn.functional
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu and not torch.cuda.is_available():
        from .cli import CommandError

        raise CommandError("--compare-torch: flashcupy ran on the GPU but torch has no CUDA device")
    rng = np.random.default_rng([cfg.seed, 0])
    params = {}
    for name, shape in _train.parameter_shapes(cfg):
        value = _train.initial_values(name, shape, rng, cfg.layers)
        params[name] = torch.nn.Parameter(torch.from_numpy(value).to(device))
    decay = [p for p in params.values() if p.ndim == 2]
    no_decay = [p for p in params.values() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=1e-8, fused=on_gpu)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if on_gpu and amp_dtype is not None else None

    def loss_fn(idx, targets):
        p, c, h = params, cfg.width, cfg.heads
        b, s = idx.shape
        x = p["wte"][idx] + p["wpe"][:s]
        for i in range(cfg.layers):
            a = F.layer_norm(x, (c,), p[f"h{i}.ln1.w"], p[f"h{i}.ln1.b"], eps=1e-5)
            qkv = (a @ p[f"h{i}.attn.qkv.w"] + p[f"h{i}.attn.qkv.b"]).view(b, s, 3, h, c // h)
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, c)
            x = x + (y @ p[f"h{i}.attn.proj.w"] + p[f"h{i}.attn.proj.b"])
            m = F.layer_norm(x, (c,), p[f"h{i}.ln2.w"], p[f"h{i}.ln2.b"], eps=1e-5)
            m = F.gelu(m @ p[f"h{i}.mlp.fc.w"] + p[f"h{i}.mlp.fc.b"], approximate="tanh")
            x = x + (m @ p[f"h{i}.mlp.proj.w"] + p[f"h{i}.mlp.proj.b"])
        x = F.layer_norm(x, (c,), p["ln_f.w"], p["ln_f.b"], eps=1e-5)
        logits = x @ p["lm_head.w"]
        return F.cross_entropy(logits.float().view(-1, _train.VOCAB), targets.reshape(-1))

    def forward(idx, targets):
        if autocast is None:
            return loss_fn(idx, targets)
        with autocast():
            return loss_fn(idx, targets)

    train_dev = torch.from_numpy(np.array(train_bytes)).to(device)  # copies: torch wants writable arrays
    val_dev = torch.from_numpy(np.array(val_bytes)).to(device)
    offsets = torch.from_numpy(_train.batch_offsets(len(train_bytes), cfg)).to(device)
    span = torch.arange(cfg.seq_len + 1, device=device)

    def batch(data, starts):
        chunk = data[starts[:, None] + span].long()
        return chunk[:, :-1], chunk[:, 1:]

    def evaluate():
        starts = np.linspace(0, len(val_bytes) - cfg.seq_len - 1, cfg.eval_batches * cfg.batch_size)
        starts = torch.from_numpy(starts.astype(np.int64).reshape(cfg.eval_batches, cfg.batch_size)).to(device)
        with torch.no_grad():
            total = sum(forward(*batch(val_dev, starts[i])) for i in range(cfg.eval_batches))
        return float(total) / cfg.eval_batches

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    history, pending = {"train": [], "val": []}, []
    first_step_s, train_time, train_tokens = None, 0.0, 0
    seg_start, seg_tokens = time.perf_counter(), 0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _train.learning_rate(step, cfg)
        loss = forward(*batch(train_dev, offsets[step]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        seg_tokens += tokens_per_step
        done = step + 1
        evaluate_now = done % cfg.eval_every == 0 or done == cfg.steps
        if not (step == 0 or done % cfg.log_every == 0 or evaluate_now):
            continue
        sync()
        history["train"] += [float(v) for v in torch.stack(pending).cpu()]
        pending.clear()
        now = time.perf_counter()
        if step == 0:
            first_step_s = now - seg_start
        else:
            train_time, train_tokens = train_time + now - seg_start, train_tokens + seg_tokens
        seg_tokens = 0
        if evaluate_now:
            history["val"].append((done, evaluate()))
        seg_start = time.perf_counter()
    rate = train_tokens / train_time if train_time > 0 else (tokens_per_step / first_step_s if first_step_s else None)
    return {"torch": torch.__version__, "device": str(device), "autocast": None if autocast is None else cfg.dtype,
            "tokens_per_s": rate, "first_step_s": first_step_s, "train_time_s": train_time,
            "train_losses": history["train"], "val_losses": history["val"],
            "final_val_loss": history["val"][-1][1] if history["val"] else None}


def compare(ours: dict, twin: dict) -> dict:
    """How the two runs agree. noise: the standard deviation of flashcupy's per-step train loss over the
    last 10% of the steps about its mean (the batch-to-batch noise of a loss at that point); the
    difference of the two runs' mean train loss over those steps is stated in units of it, and the
    validation losses' difference as a ratio."""
    a, b = np.asarray(ours["train_losses"], np.float64), np.asarray(twin["train_losses"], np.float64)
    n = min(len(a), len(b))
    tail = max(1, n // 10)
    ta, tb = a[n - tail:n], b[n - tail:n]
    noise = float(ta.std()) if tail > 1 else float("nan")
    diff = float(ta.mean() - tb.mean())
    va, vb = ours.get("final_val_loss"), twin.get("final_val_loss")
    speed = (ours["tokens_per_s"] / twin["tokens_per_s"]) if ours.get("tokens_per_s") and twin.get("tokens_per_s") else None
    return {"tokens_per_s_ratio": speed, "tail_steps": tail, "tail_train_loss_flashcupy": float(ta.mean()),
            "tail_train_loss_torch": float(tb.mean()), "tail_train_loss_difference": diff,
            "train_loss_noise": noise,
            "difference_in_noise_units": diff / noise if noise and math.isfinite(noise) and noise > 0 else None,
            "final_val_loss_ratio": (va / vb) if va is not None and vb else None}
