"""Train a byte-level GPT on real text with flashcupy attention, on flashcupy's autodiff tape.

The model: bytes (vocabulary 256) -> token + learned position embeddings -> pre-LayerNorm blocks
(x + attention(LN(x)), x + MLP(LN(x)), MLP = linear, GELU (tanh), linear) -> LayerNorm -> linear to
256 logits; loss = mean cross-entropy of the next byte, in nats/byte. Weights, activations and the
optimizer are float32 (master weights); on the GPU attention runs in bfloat16 (or float16) on
flashcupy's fused kernels, its gradients cast back to float32 by the tape. AdamW with linear warmup
and cosine decay, global gradient-norm clipping.

Data: the Python standard library's own source files (every *.py under sysconfig's "stdlib" path,
site-packages excluded, in sorted path order), or --text FILE|DIR. The last 10% of the bytes is the
validation split. Batches are random windows drawn from a seeded generator for every step up front,
so a run is reproducible and --attention flash / naive see the same data.

GPU hot loop: parameters, gradients and Adam moments each live in one flat device buffer; the batch
is gathered on the device from precomputed offsets; the gradient norm and the clip factor stay on the
device. The host waits for the GPU only every --log-every steps, to read the losses of those steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from . import tape as T
from ._arrays import bfloat16, cupy_or_none, dtype_name, gpu_available
from .cli import CommandError

VOCAB = 256
LOSS_UNIT = "nats/byte"

# Defaults that fit the machine: the GPU one is the reference config of issue 6; the CPU one finishes
# in about a minute on two cores.
DEFAULTS = {
    "gpu": dict(steps=1000, seq_len=1024, batch_size=16, layers=6, width=384, heads=6, lr=1e-3,
                warmup=100, eval_every=100, eval_batches=8, log_every=10, dtype="bf16"),
    "cpu": dict(steps=1000, seq_len=128, batch_size=8, layers=3, width=96, heads=4, lr=3e-3,
                warmup=50, eval_every=100, eval_batches=4, log_every=10, dtype="fp32"),
}
# --preset long (issue 21): what flash attention is for, context 16k bytes on the GPU (2k on the CPU),
# one sequence a step so a step holds about as many tokens as the default's 16 x 1024; the rest of each
# device's defaults as above. The naive path stores each layer's (heads, 16k, 16k) score and probability
# matrices for the backward (6 heads x 256 Mi entries x 4 B = 6 GiB a matrix at the GPU shape).
PRESETS = {
    "default": {},
    "long": {"gpu": dict(seq_len=16384, batch_size=1, steps=600, warmup=50, eval_every=100, eval_batches=2),
             "cpu": dict(seq_len=2048, batch_size=1, steps=200, warmup=20, eval_every=50, eval_batches=2)},
}
ATTENTION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MODEL_KEYS = ("seq_len", "layers", "width", "heads")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; None means "the device's default" (DEFAULTS) until resolve() fills it."""

    text: str | None = None
    attention: str = "flash"
    steps: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    lr: float | None = None
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    device: str = "auto"
    dtype: str | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    log_every: int | None = None
    val_fraction: float = 0.1
    seed: int | None = None
    save: str | None = None
    resume: str | None = None
    out: str = "runs"
    compare_torch: bool = False
    preset: str = "default"


# -- command line --------------------------------------------------------------------------------------


def add_arguments(p):
    p.add_argument("--text", metavar="PATH", help="a text file or a directory of them (default: the Python "
                   "standard library's source files)")
    p.add_argument("--attention", choices=("flash", "naive"), default="flash",
                   help="flashcupy's attention, or naive matmul-softmax-matmul (same math, O(N^2) memory)")
    p.add_argument("--steps", type=int, help="optimizer steps (GPU default 1000, CPU 1000)")
    p.add_argument("--seq-len", type=int, help="context length in bytes (GPU 1024, CPU 128)")
    p.add_argument("--batch-size", type=int, help="sequences per step (GPU 16, CPU 8)")
    p.add_argument("--layers", type=int, help="transformer blocks (GPU 6, CPU 3)")
    p.add_argument("--width", type=int, help="model width (GPU 384, CPU 96)")
    p.add_argument("--heads", type=int, help="attention heads; width must be a multiple (GPU 6, CPU 4)")
    p.add_argument("--lr", type=float, help="peak learning rate (GPU 1e-3, CPU 3e-3)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (GPU 100, CPU 50)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="gpu: CuPy on the current CUDA device; cpu: NumPy; auto: gpu where CuPy has a GPU")
    p.add_argument("--dtype", choices=tuple(ATTENTION_DTYPES), help="dtype attention runs in "
                   "(GPU default bf16; CPU default fp32); everything else is float32")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps (default 100)")
    p.add_argument("--log-every", type=int, help="read losses back and refresh the progress bar every N steps (default 10)")
    p.add_argument("--save", metavar="PATH", help="write a checkpoint (.npz) at the end or on Ctrl-C")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint written by --save (its text, "
                   "model, schedule and seed unless given again; --steps extends the run)")
    p.add_argument("--out", metavar="DIR", default="runs", help="where the JSON summary and loss-curve PNG go")
    p.add_argument("--seed", type=int, help="seeds the initial weights and the batch order (default 0, or the "
                   "checkpoint's when resuming)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="default: the settings above; long: context 16k bytes on the GPU (2k on the CPU), one "
                        "sequence a step, 600 steps (CPU 200), where naive attention's O(N^2) memory shows; "
                        "options given explicitly override the preset")
    p.add_argument("--compare-torch", action="store_true",
                   help="then train the same model in PyTorch in this process (same init, batches, schedule and "
                        "AdamW; bf16 autocast and SDPA on a GPU) and report both loss curves and tokens/s")


def run(args) -> int:
    """`flashcupy train`: exit status 0, or 130 when Ctrl-C ended the run (its summary is written)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    return 130 if train(cfg)["interrupted"] else 0


# -- device and configuration --------------------------------------------------------------------------


def pick_device(name: str):
    """numpy or cupy for --device auto|cpu|gpu."""
    if name == "cpu":
        return np
    if gpu_available():
        return cupy_or_none()
    if name == "gpu":
        raise CommandError("--device gpu: no CUDA GPU is usable through CuPy (install flashcupy[cuda12] or "
                           "[cuda13] on a machine with an NVIDIA driver), or pass --device cpu")
    return np


def resolve(cfg: TrainConfig, xp, checkpoint_config: dict | None = None) -> TrainConfig:
    """Fill unset fields from the checkpoint being resumed (its text, model, schedule and seed), then from
    the device's DEFAULTS; validate."""
    cfg = dataclasses.replace(cfg)
    if checkpoint_config is not None:
        for key in MODEL_KEYS:
            given = getattr(cfg, key)
            if given is not None and given != checkpoint_config[key]:
                raise CommandError(f"--{key.replace('_', '-')} {given} does not match the checkpoint being "
                                   f"resumed ({checkpoint_config[key]})")
        for key, value in checkpoint_config.items():
            if key in ("save", "resume", "device", "dtype", "out", "compare_torch", "preset"):  # per invocation or device
                continue
            if getattr(cfg, key, None) is None:
                setattr(cfg, key, value)
    if cfg.preset not in PRESETS:
        raise CommandError(f"--preset: expected one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    where = "cpu" if xp is np else "gpu"
    for key, value in dict(DEFAULTS[where], **PRESETS[cfg.preset].get(where, {}), seed=0).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    for key in ("steps", "seq_len", "batch_size", "layers", "width", "heads", "eval_every", "eval_batches",
                "log_every"):
        if getattr(cfg, key) < 1:
            raise CommandError(f"--{key.replace('_', '-')}: expected a positive integer, got {getattr(cfg, key)}")
    if cfg.width % cfg.heads:
        raise CommandError(f"--width {cfg.width} is not a multiple of --heads {cfg.heads}")
    if cfg.warmup < 0 or not cfg.lr > 0:
        raise CommandError(f"expected --lr > 0 and --warmup >= 0, got {cfg.lr} and {cfg.warmup}")
    if cfg.dtype == "bf16" and bfloat16() is None:
        raise CommandError("--dtype bf16 needs ml_dtypes (pip install ml_dtypes), or pass --dtype fp16")
    return cfg


def attention_dtype(cfg):
    return bfloat16() if cfg.dtype == "bf16" else np.dtype(ATTENTION_DTYPES[cfg.dtype])


def device_name(xp) -> str:
    if xp is np:
        return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"
    cp = xp
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"]
    return f"gpu {dev.id}: {name.decode() if isinstance(name, bytes) else name}"


# -- data ----------------------------------------------------------------------------------------------

SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_sources() -> tuple[Path, list[Path]]:
    """The standard library's *.py files (site-packages excluded), sorted by their path under the root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(root).parts)]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_sources(path: str) -> tuple[Path, list[Path]]:
    """A file, or every file under a directory (hidden and __pycache__ folders skipped), in sorted order."""
    root = Path(path)
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise CommandError(f"--text {path}: no such file or directory")
    files = [p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(text: str | None):
    """(all bytes as a uint8 array, a description dict)."""
    root, files = stdlib_sources() if text is None else text_sources(text)
    data = b"".join(p.read_bytes() for p in files)
    if not data:
        raise CommandError(f"--text {text}: no bytes to train on" if text else f"no *.py files under {root}")
    source = f"Python {platform.python_version()} standard library ({root}, *.py)" if text is None else str(text)
    return np.frombuffer(data, dtype=np.uint8), {"source": source, "files": len(files), "bytes": len(data)}


def split_corpus(data, cfg):
    """(train, val): the last val_fraction of the bytes is held out; both must hold a window of seq_len + 1."""
    n_val = int(len(data) * cfg.val_fraction)
    train, val = data[: len(data) - n_val], data[len(data) - n_val:]
    need = cfg.seq_len + 1
    if len(train) < need or len(val) < need:
        raise CommandError(f"the text has {len(data)} bytes: its train/validation split ({len(train)}/{len(val)} "
                           f"bytes) needs at least --seq-len + 1 = {need} bytes on each side; "
                           f"use a shorter --seq-len or a longer --text")
    return train, val


def unigram_entropy(data) -> float:
    """Entropy of the byte frequencies of data in nats/byte (the loss of a model that knows only those)."""
    p = np.bincount(data, minlength=VOCAB) / len(data)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def batch_offsets(n_bytes, cfg) -> np.ndarray:
    """Window starts for every step, (steps, batch_size), from the seed alone: row i is the same for any
    total number of steps, so a resumed run sees the batches an uninterrupted one would."""
    rng = np.random.default_rng([cfg.seed, 1])
    return rng.integers(0, n_bytes - cfg.seq_len, size=(cfg.steps, cfg.batch_size))


def windows(data, offsets, seq_len, xp):
    """Inputs and next-byte targets, (batch, seq_len) int64 each, gathered on data's device."""
    chunk = data[offsets[:, None] + xp.arange(seq_len + 1)]  # (batch, seq_len + 1) uint8
    return chunk[:, :-1].astype(xp.int64), chunk[:, 1:].astype(xp.int64)


# -- model ---------------------------------------------------------------------------------------------


def parameter_shapes(cfg) -> list[tuple[str, tuple]]:
    c = cfg.width
    shapes = [("wte", (VOCAB, c)), ("wpe", (cfg.seq_len, c))]
    for i in range(cfg.layers):
        shapes += [(f"h{i}.ln1.w", (c,)), (f"h{i}.ln1.b", (c,)),
                   (f"h{i}.attn.qkv.w", (c, 3 * c)), (f"h{i}.attn.qkv.b", (3 * c,)),
                   (f"h{i}.attn.proj.w", (c, c)), (f"h{i}.attn.proj.b", (c,)),
                   (f"h{i}.ln2.w", (c,)), (f"h{i}.ln2.b", (c,)),
                   (f"h{i}.mlp.fc.w", (c, 4 * c)), (f"h{i}.mlp.fc.b", (4 * c,)),
                   (f"h{i}.mlp.proj.w", (4 * c, c)), (f"h{i}.mlp.proj.b", (c,))]
    return shapes + [("ln_f.w", (c,)), ("ln_f.b", (c,)), ("lm_head.w", (c, VOCAB))]


def initial_values(name, shape, rng, layers) -> np.ndarray:
    """GPT-2's init: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 layers), zero biases,
    LayerNorm weight 1."""
    if name.endswith(".b"):
        return np.zeros(shape, np.float32)
    if ".ln" in name or name.startswith("ln_"):
        return np.ones(shape, np.float32)
    std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.w") else 0.02
    return (std * rng.standard_normal(shape)).astype(np.float32)


class GPT:
    """Parameters in one flat float32 buffer (views per tensor), gradients in another: the optimizer
    updates everything with a handful of elementwise kernels, and zeroing the grads is one fill."""

    def __init__(self, cfg, xp, flat_values=None):
        self.cfg, self.xp = cfg, xp
        self.shapes = parameter_shapes(cfg)
        sizes = [int(np.prod(s)) for _, s in self.shapes]
        self.size = int(np.sum(sizes))
        if flat_values is None:
            rng = np.random.default_rng([cfg.seed, 0])
            flat_values = np.concatenate([initial_values(n, s, rng, cfg.layers).ravel() for n, s in self.shapes])
        if flat_values.shape != (self.size,):
            raise CommandError(f"checkpoint holds {flat_values.size} parameters, the model has {self.size}")
        self.flat = xp.asarray(flat_values, dtype=xp.float32)
        self.flat_grad = xp.zeros_like(self.flat)
        self.params, decay, offset = {}, [], 0
        for (name, shape), n in zip(self.shapes, sizes):
            t = T.Tensor(self.flat[offset:offset + n].reshape(shape), requires_grad=True, name=name)
            t.grad = self.flat_grad[offset:offset + n].reshape(shape)  # the tape adds into this view
            self.params[name] = t
            decay.append(np.full(n, 1.0 if len(shape) == 2 else 0.0, np.float32))  # matrices decay
            offset += n
        self.decay_mask = xp.asarray(np.concatenate(decay))
        attend = T.flash_attention if cfg.attention == "flash" else T.naive_attention
        self.attn_dtype = attention_dtype(cfg)
        self.attend = lambda q, k, v: attend(q, k, v, causal=True, dtype=self.attn_dtype)

    def zero_grad(self):
        self.flat_grad.fill(0)

    def loss(self, idx, targets):
        """Mean next-byte cross-entropy (nats) of idx (batch, seq_len) against targets (batch, seq_len)."""
        p, cfg = self.params, self.cfg
        seq_len = idx.shape[1]
        x = T.embedding(p["wte"], idx) + p["wpe"][:seq_len]  # (B, S, C)
        for i in range(cfg.layers):
            x = x + self.attention(i, T.layer_norm(x, p[f"h{i}.ln1.w"], p[f"h{i}.ln1.b"]))
            h = T.layer_norm(x, p[f"h{i}.ln2.w"], p[f"h{i}.ln2.b"])
            h = T.gelu(T.linear(h, p[f"h{i}.mlp.fc.w"], p[f"h{i}.mlp.fc.b"]))  # (B, S, 4C)
            x = x + T.linear(h, p[f"h{i}.mlp.proj.w"], p[f"h{i}.mlp.proj.b"])
        x = T.layer_norm(x, p["ln_f.w"], p["ln_f.b"])
        return T.cross_entropy(T.linear(x, p["lm_head.w"]), targets)  # logits (B, S, 256)

    def attention(self, i, x):
        p, cfg = self.params, self.cfg
        batch, seq_len, width = x.shape
        head_dim = width // cfg.heads
        qkv = T.linear(x, p[f"h{i}.attn.qkv.w"], p[f"h{i}.attn.qkv.b"])  # (B, S, 3C)
        qkv = qkv.reshape(batch, seq_len, 3, cfg.heads, head_dim)  # BSHD per q, k, v: no transpose needed
        y = self.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # (B, S, H, D)
        return T.linear(y.reshape(batch, seq_len, width), p[f"h{i}.attn.proj.w"], p[f"h{i}.attn.proj.b"])


# -- optimizer -----------------------------------------------------------------------------------------


class AdamW:
    """AdamW (decoupled weight decay) on the flat buffers, with global gradient-norm clipping.

    The clip factor min(1, max_norm / |g|) is computed on the device, so a step never waits for the GPU.
    """

    def __init__(self, model, cfg, state=None):
        self.model, self.cfg, xp = model, cfg, model.xp
        self.m = xp.zeros_like(model.flat) if state is None else xp.asarray(state["adam_m"])
        self.v = xp.zeros_like(model.flat) if state is None else xp.asarray(state["adam_v"])
        self.t = 0 if state is None else int(state["adam_t"])

    def step(self, lr):
        """One update; returns the gradient norm before clipping, a 0-d device array."""
        xp, cfg, p, g = self.model.xp, self.cfg, self.model.flat, self.model.flat_grad
        self.t += 1
        norm = xp.sqrt((g * g).sum())
        g = g * xp.minimum(1.0, cfg.grad_clip / (norm + 1e-6))
        self.m *= cfg.beta1
        self.m += (1.0 - cfg.beta1) * g
        self.v *= cfg.beta2
        self.v += (1.0 - cfg.beta2) * (g * g)
        p *= 1.0 - (lr * cfg.weight_decay) * self.model.decay_mask
        step_size = lr / (1.0 - cfg.beta1**self.t)
        p -= step_size * self.m / (xp.sqrt(self.v / (1.0 - cfg.beta2**self.t)) + 1e-8)
        return norm


def learning_rate(step, cfg) -> float:
    """Linear warmup to cfg.lr over cfg.warmup steps, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1.0 + math.cos(math.pi * progress))


def to_host(x) -> np.ndarray:
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def evaluate(model, val, cfg, xp) -> float:
    """Mean loss over eval_batches fixed batches of windows spread evenly over the validation bytes."""
    starts = np.linspace(0, len(val) - cfg.seq_len - 1, cfg.eval_batches * cfg.batch_size).astype(np.int64)
    starts = xp.asarray(starts.reshape(cfg.eval_batches, cfg.batch_size))
    total = 0.0
    with T.no_grad():
        for i in range(cfg.eval_batches):
            total = total + model.loss(*windows(val, starts[i], cfg.seq_len, xp)).data
    return float(to_host(total)) / cfg.eval_batches


# -- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(path, model, opt, step, cfg, history):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, params=to_host(model.flat), adam_m=to_host(opt.m), adam_v=to_host(opt.v),
                 adam_t=np.int64(opt.t), step=np.int64(step), config=json.dumps(dataclasses.asdict(cfg)),
                 names=json.dumps(model.shapes), train_losses=np.asarray(history["train"], np.float64),
                 val_losses=np.asarray(history["val"], np.float64).reshape(-1, 2))
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    try:
        with np.load(path) as z:
            state = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CommandError(f"--resume {path}: cannot read a checkpoint ({e})") from e
    state["config"] = json.loads(str(state["config"]))
    return state


# -- reporting -----------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar when tqdm is installed (the `train` extra), else a line of text every --log-every steps."""

    def __init__(self, total, initial):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = None if tqdm is None else tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                                  mininterval=0.5)
        self.total = total

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step, loss, tokens_per_s):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        else:
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tokens/s", flush=True)

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class MemoryMeter:
    """Peak memory: on the GPU the bytes CuPy's default memory pool holds (it keeps every block it has
    allocated, so at the end that is the run's high-water mark, including cached free blocks); on the
    CPU the process's peak resident set size."""

    def __init__(self, xp):
        self.xp = xp
        if xp is not np:
            xp.get_default_memory_pool().free_all_blocks()

    def peak(self) -> tuple[int | None, str]:
        if self.xp is not np:
            return int(self.xp.get_default_memory_pool().total_bytes()), "cupy default memory pool, bytes held at the end"
        try:
            import resource
        except ImportError:
            return None, "unavailable"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024), "process peak resident set size (ru_maxrss)"


class StopFlag:
    """The first Ctrl-C asks the loop to stop after the current step; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and writing the summary (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def plot_losses(path, history, entropy, cfg, title, other=None) -> str | None:
    """Write the loss curve as a PNG; returns None (and says why) when matplotlib is absent."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no loss-curve PNG (pip install 'flashcupy[train]')")
        return None
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    train = np.asarray(history["train"])
    ax.plot(np.arange(1, len(train) + 1), train, lw=0.8, alpha=0.8, label="train (per step)")
    if history["val"]:
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", ms=3, label="validation")
    if other is not None:  # (label, {"train": [...], "val": [(step, loss), ...]}): a second run, e.g. PyTorch's
        label, hist = other
        ax.plot(np.arange(1, len(hist["train"]) + 1), hist["train"], lw=0.8, alpha=0.6, label=f"{label} train")
        if hist["val"]:
            steps, losses = zip(*hist["val"])
            ax.plot(steps, losses, "s--", ms=3, label=f"{label} validation")
    ax.axhline(entropy, color="gray", ls="--", lw=0.8, label=f"unigram entropy {entropy:.3f}")
    ax.axhline(0.6 * entropy, color="gray", ls=":", lw=0.8, label="0.6 x unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({LOSS_UNIT})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def run_name(cfg, xp) -> str:
    return f"train-{cfg.attention}-{'cpu' if xp is np else 'gpu'}-{time.strftime('%Y%m%d-%H%M%S')}"


def unique_path(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


# -- the job -------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Run a training job; returns the summary it also writes as JSON."""
    wall_start = time.perf_counter()
    xp = pick_device(cfg.device)
    if cfg.compare_torch and cfg.resume:
        raise CommandError("--compare-torch trains both models from the start: not with --resume")
    state = load_checkpoint(cfg.resume) if cfg.resume else None
    cfg = resolve(cfg, xp, None if state is None else state["config"])
    data, corpus = load_corpus(cfg.text)
    train_bytes, val_bytes = split_corpus(data, cfg)
    entropy = unigram_entropy(val_bytes)
    corpus.update(train_bytes=len(train_bytes), val_bytes=len(val_bytes))

    meter = MemoryMeter(xp)
    model = GPT(cfg, xp, None if state is None else state["params"])
    opt = AdamW(model, cfg, state)
    start = 0 if state is None else int(state["step"])
    history = {"train": [] if state is None else [float(x) for x in state["train_losses"]],
               "val": [] if state is None else [(int(s), float(v)) for s, v in state["val_losses"]]}
    train_dev, val_dev = xp.asarray(train_bytes), xp.asarray(val_bytes)
    offsets = xp.asarray(batch_offsets(len(train_bytes), cfg))
    tokens_per_step = cfg.batch_size * cfg.seq_len

    device = device_name(xp)
    print(f"flashcupy train on {device}: {cfg.attention} attention in {dtype_name(model.attn_dtype)}, "
          f"{cfg.layers} layers x width {cfg.width} x {cfg.heads} heads, {model.size:,} parameters (float32)")
    print(f"data: {corpus['source']}: {corpus['files']} files, {corpus['bytes']:,} bytes "
          f"({len(train_bytes):,} train / {len(val_bytes):,} validation)")
    print(f"validation text: unigram (byte-frequency) entropy {entropy:.4f} nats/byte = "
          f"{entropy / math.log(2):.4f} bits/byte. Losses are in nats/byte; 0.6 x entropy = {0.6 * entropy:.4f}")
    print(f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes, lr {cfg.lr:g} (warmup {cfg.warmup}, "
          f"cosine to {cfg.lr * cfg.min_lr_ratio:g}), seed {cfg.seed}" + (f", resumed at step {start}" if start else ""))

    first_step_s, train_time, train_tokens = None, 0.0, 0
    pending, interrupted, stopped_reason = [], False, None
    progress = Progress(cfg.steps, start)
    try:
        with StopFlag() as stop:
            seg_start, seg_tokens = time.perf_counter(), 0
            for step in range(start, cfg.steps):
                x, y = windows(train_dev, offsets[step], cfg.seq_len, xp)
                model.zero_grad()
                loss = model.loss(x, y)
                loss.backward()
                opt.step(learning_rate(step, cfg))
                pending.append(loss.data)
                seg_tokens += tokens_per_step
                progress.advance()
                done = step + 1
                last = done == cfg.steps or stop.requested
                evaluate_now = done % cfg.eval_every == 0 or last
                if not (step == start or done % cfg.log_every == 0 or evaluate_now):
                    continue
                losses = [float(v) for v in to_host(xp.stack(pending))]  # the one wait for the GPU
                pending.clear()
                now = time.perf_counter()
                if step == start:  # the first step compiles kernels and warms the pool: timed apart
                    first_step_s = now - seg_start
                else:
                    train_time, train_tokens = train_time + now - seg_start, train_tokens + seg_tokens
                seg_tokens = 0
                history["train"] += losses
                rate = train_tokens / train_time if train_time > 0 else tokens_per_step / first_step_s
                progress.report(done, losses[-1], rate)
                if not all(math.isfinite(v) for v in losses):
                    stopped_reason = f"loss is not finite at step {done}"
                    progress.write(f"stopping: {stopped_reason}")
                    break
                if evaluate_now:
                    val = evaluate(model, val_dev, cfg, xp)
                    history["val"].append((done, val))
                    progress.write(f"step {done}: train {losses[-1]:.4f}  val {val:.4f} {LOSS_UNIT}  "
                                   f"({val / entropy:.3f} x unigram entropy)")
                if stop.requested:
                    interrupted = True
                    break
                seg_start = time.perf_counter()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, with what was measured
        interrupted = True
        if pending:
            history["train"] += [float(v) for v in to_host(xp.stack(pending))]
    finally:
        progress.close()

    steps_done = len(history["train"])
    if cfg.save:
        save_checkpoint(cfg.save, model, opt, steps_done, cfg, history)
    peak, peak_kind = meter.peak()
    final_val = history["val"][-1][1] if history["val"] else None
    tail = history["train"][-10:]
    rate = (train_tokens / train_time if train_time > 0
            else (tokens_per_step / first_step_s if first_step_s else None))
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = unique_path(out_dir / f"{run_name(cfg, xp)}.json")
    title = (f"{cfg.attention} attention, {cfg.layers}x{cfg.width}, {cfg.batch_size}x{cfg.seq_len} bytes, "
             f"{device}")
    twin = None
    if cfg.compare_torch and not interrupted:
        from . import _train_torch

        print("--compare-torch: the same model, batches and optimizer in PyTorch ...", flush=True)
        twin = _train_torch.run_twin(cfg, train_bytes, val_bytes, on_gpu=xp is not np)
    other = None if twin is None else (f"PyTorch {twin['torch']}", {"train": twin["train_losses"], "val": twin["val_losses"]})
    plot = plot_losses(base.with_suffix(".png"), history, entropy, cfg, title, other) if history["train"] else None
    summary = {
        "command": "flashcupy train",
        "config": dataclasses.asdict(cfg),
        "device": device,
        "attention": cfg.attention,
        "attention_dtype": dtype_name(model.attn_dtype),
        "parameters": model.size,
        "corpus": corpus,
        "steps": steps_done,
        "interrupted": interrupted,
        "stopped_reason": stopped_reason,
        "loss_unit": LOSS_UNIT,
        "final_train_loss": float(np.mean(tail)) if tail else None,
        "final_train_loss_steps": len(tail),
        "final_val_loss": final_val,
        "unigram_entropy": entropy,
        "unigram_entropy_bits": entropy / math.log(2),
        "val_loss_over_unigram_entropy": None if final_val is None else final_val / entropy,
        "tokens_per_s": rate,
        "tokens_per_step": tokens_per_step,
        "first_step_s": first_step_s,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - wall_start,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "train_losses": history["train"],
        "val_losses": history["val"],
        "files": {"summary": str(base), "plot": plot, "checkpoint": cfg.save},
    }
    if twin is not None:
        from . import _train_torch

        summary["torch"] = twin
        summary["comparison"] = _train_torch.compare(summary, twin)
        c = summary["comparison"]
        print(f"PyTorch {twin['torch']} ({twin['device']}, autocast {twin['autocast']}): "
              f"{twin['tokens_per_s']:,.0f} tokens/s; flashcupy / PyTorch = {c['tokens_per_s_ratio']:.2f}x; "
              f"mean train loss over the last {c['tail_steps']} steps {c['tail_train_loss_flashcupy']:.4f} vs "
              f"{c['tail_train_loss_torch']:.4f} (step-to-step noise {c['train_loss_noise']:.4f}); final val "
              f"{summary['final_val_loss']} vs {twin['final_val_loss']}")
    base.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("steps", "interrupted", "final_train_loss", "final_val_loss",
                                              "unigram_entropy", "val_loss_over_unigram_entropy", "tokens_per_s",
                                              "peak_memory_bytes", "wall_time_s")}, indent=1))
    print(f"summary: {base}" + (f"\nloss curve: {plot}" if plot else "") + (f"\ncheckpoint: {cfg.save}" if cfg.save else ""))
    return summary
