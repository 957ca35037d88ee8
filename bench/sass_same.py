"""Is a kernel change invisible to the kernels it should not touch? Compare their SASS (NVRTC -> cubin ->
nvdisasm, no GPU) between this tree and a base tree, up to register numbers and labels.

    python bench/sass_same.py dump OUT.json [--arch sm_90a] [--set h200|features]   # PYTHONPATH=<tree>
    python bench/sass_same.py compare BASE.json NEW.json

`dump` compiles, in the tree on PYTHONPATH, the plain (FEAT = 0) specializations the dispatcher launches
on an H200 (--set h200: every head-dim bucket, causal or not, dropout or not, deterministic or not, of the
mma.sync, Hopper, SIMT, DMMA and TF32 families; names come from *this* script's tree, which must
exist in both) and writes {kernel name: normalized instruction list}. `compare` prints, per kernel,
"same", or the first differing instruction and the opcode-count difference. Used for issue 16: the FEAT
bits must leave FEAT = 0 kernels exactly as they were on the GPU-verified tree.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")


def feature_names() -> dict:
    """{source: [kernel names]} of every forward family's FEAT specializations on an H200's chosen tiles
    (FEAT_SINK alone and all four features, hd 64 / 128, causal or not): the check for a change to the
    forwards' epilogues (--set features)."""
    from flashcupy import _configs, _gpu_sm90
    from flashcupy._device import as_device
    from flashcupy._features import FEAT_ALL, FEAT_SINK

    dev, out = as_device(90), collections.defaultdict(set)
    for hd in (64, 128):
        for causal in (False, True):
            for f in (FEAT_SINK, FEAT_ALL):
                out["flash_fwd.cu"].add(_configs.fwd_config(hd, "float16", causal, dev, None).kernel_name("Bf16", causal, False, f))
                sm = _gpu_sm90.config_for(hd, causal)
                out[_gpu_sm90.SOURCE].add(sm.kernel_name("Bf16", causal, False, f))
                for dtype, tf32 in (("float32", False), ("float32", True), ("float64", False)):
                    c = _configs.float_fwd_config(hd, dtype, causal, dev, tf32)
                    out[c.source].add(c.kernel_name(f))
    return {k: sorted(v) for k, v in out.items()}


def h200_names() -> dict:
    """{source: [plain kernel names]} the dispatcher can launch on an H200 (cc 9.0, 227 KB)."""
    from flashcupy import _configs, _gpu_sm90, _gpu_sm90_bwd
    from flashcupy._device import as_device

    dev, out = as_device(90), collections.defaultdict(set)
    for hd in _configs.HEAD_DIM_BUCKETS:
        for causal in (False, True):
            fc, bc = _configs.fwd_config(hd, "float16", causal, dev, None), _configs.bwd_config(hd, "float16", causal, dev, None)
            for drop in (False, True):
                out["flash_fwd.cu"].add(fc.kernel_name("Bf16", causal, drop))
                for det in (False, True):
                    atomic = bc.atomic_dq(det, drop)
                    out["flash_bwd.cu"].add(bc.kernel_name("Bf16", causal, atomic, drop))
                    if not atomic:
                        out["flash_bwd.cu"].add(bc.dq_kernel_name("Bf16", causal, drop))
            for dtype, tf32 in (("float32", False), ("float32", True), ("float64", False)):
                ff, fb = (_configs.float_fwd_config(hd, dtype, causal, dev, tf32),
                          _configs.float_bwd_config(hd, dtype, causal, dev, tf32))
                if ff is not None:
                    out[ff.source].add(ff.kernel_name())
                if fb is not None:
                    out[fb.source] |= {fb.kv_kernel_name(), fb.dq_kernel_name()}
    for elem, causal, drop, cfg in _gpu_sm90.all_specializations(dropout=True):
        if elem == "Bf16":
            out[_gpu_sm90.SOURCE].add(cfg.kernel_name(elem, causal, drop))
    for elem, causal, det, cfg in _gpu_sm90_bwd.all_specializations(deterministic=True):
        if elem == "Bf16":
            out[_gpu_sm90_bwd.SOURCE].add(cfg.kernel_name(elem, causal, det))
    return {k: sorted(v) for k, v in out.items()}


_NORM = [(re.compile(r"/\*[0-9a-f]{4,}\*/"), ""), (re.compile(r"\bU?R\d+\b"), "R"), (re.compile(r"\bU?P\d\b"), "P"),
         (re.compile(r"\.L_x_\d+"), ".L"), (re.compile(r"`\(_Z\w+\)"), "(fn)"), (re.compile(r"\s+"), " ")]


def normalize(line: str) -> str:
    for pat, rep in _NORM:
        line = pat.sub(rep, line)
    return line.strip()


def dump(path: str, arch: str, which: str = "h200") -> None:
    names = h200_names() if which == "h200" else feature_names()  # imports flashcupy from PYTHONPATH first (tools/sass.py would put its own tree first)
    import flashcupy

    print(f"flashcupy from {os.path.dirname(flashcupy.__file__)}", flush=True)
    sys.path.insert(0, TOOLS)
    import sass

    out = {}
    for source, kernels in names.items():
        blob, lowered = sass.cubin(source, kernels, arch)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(blob)
            f.flush()
            text = subprocess.run([sass.nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout
        fns = sass.functions(text)
        for k in kernels:
            out[k] = [normalize(ln) for ln in fns[lowered[k]] if not re.match(r"\s*\.L_x_\d+:", ln)]
        print(f"{source}: {len(kernels)} kernels", flush=True)
    with open(path, "w") as f:
        json.dump(out, f)


def compare(base_path: str, new_path: str) -> int:
    # normalized again: the self-calls' mangled names (RET.REL to the kernel) change with a template argument
    base, new = ({k: [normalize(x) for x in v] for k, v in json.load(open(p)).items()} for p in (base_path, new_path))
    op = re.compile(r"^(?:@!?P )?([A-Z][A-Z0-9_.]*)")
    differ = 0
    for k in sorted(base.keys() & new.keys()):
        a, b = base[k], new[k]
        if a == b:
            print(f"same  {k} ({len(a)} instructions)")
            continue
        differ += 1
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        ca = collections.Counter(m.group(1) for m in map(op.match, a) if m)
        cb = collections.Counter(m.group(1) for m in map(op.match, b) if m)
        delta = {o: cb[o] - ca[o] for o in ca.keys() | cb.keys() if cb[o] != ca[o]}
        print(f"DIFF  {k}: {len(a)} -> {len(b)} instructions, first at {i}: {a[i] if i < len(a) else '-'} | "
              f"{b[i] if i < len(b) else '-'}; opcodes {dict(sorted(delta.items()))}")
    missing = sorted(base.keys() ^ new.keys())
    if missing:
        print(f"in one dump only: {missing}")
    print(f"{len(base.keys() & new.keys()) - differ} same, {differ} differ")
    return 1 if differ or missing else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--arch", default="sm_90a")
    d.add_argument("--set", dest="which", choices=("h200", "features"), default="h200",
                   help="h200: the plain kernels an H200 launches; features: the forwards' FEAT specializations")
    c = sub.add_parser("compare")
    c.add_argument("base")
    c.add_argument("new")
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.out, args.arch, args.which)
    else:
        sys.exit(compare(args.base, args.new))


if __name__ == "__main__":
    main()
