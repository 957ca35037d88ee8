"""SASS of cuda/ kernels without a GPU: NVRTC (cuda-bindings) -> cubin -> nvdisasm (the
nvidia-cuda-nvdisasm wheel, or NVDISASM=path). Prints, per kernel, the instruction count and the count of
each opcode named by --ops; --out DIR writes each kernel's SASS.

    python tools/sass.py flash_bwd_sm90.cu 'flash_bwd_sm90_kernel<Sm90BwdTraits<Bf16, 128, 64, 2, 2, false>, true>'
"""

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def nvdisasm() -> str:
    if os.environ.get("NVDISASM"):
        return os.environ["NVDISASM"]
    import nvidia

    for root in nvidia.__path__:
        hits = glob.glob(os.path.join(root, "*", "bin", "nvdisasm")) + glob.glob(os.path.join(root, "*", "*", "bin", "nvdisasm"))
        if hits:
            return hits[0]
    return "nvdisasm"


def cubin(source: str, names, arch: str):
    from cuda.bindings import nvrtc

    from flashcupy import _build

    err, prog = nvrtc.nvrtcCreateProgram(_build.load_source(source).encode(), source.encode(), 0, [], [])
    for n in names:
        nvrtc.nvrtcAddNameExpression(prog, n.encode())
    opts = [o.encode() for o in _build.BASE_OPTIONS] + [f"-arch={arch}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise SystemExit(log.decode(errors="replace"))
    lowered = {n: nvrtc.nvrtcGetLoweredName(prog, n.encode())[1].decode() for n in names}
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, buf)
    return buf, lowered


OPCODE = re.compile(r"\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")  # after the address, past a predicate


def functions(sass: str) -> dict:
    """{mangled name: [instruction lines]} of nvdisasm's output."""
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        if cur is not None and (re.match(r"\s*/\*[0-9a-f]{4,}\*/", line) or re.match(r"\.L_x_\d+:", line.strip())):
            cur.append(line)
    return out


def loops(lines) -> list:
    """(first, last, instructions) of every backward branch (a loop) among a function's lines."""
    where, out, n = {}, [], 0
    for ln in lines:
        m = re.match(r"\s*(\.L_x_\d+):", ln)
        if m:
            where[m.group(1)] = n
        else:
            n += 1
    n = 0
    for ln in lines:
        if re.match(r"\s*\.L_x_\d+:", ln):
            continue
        m = re.search(r"BRA\s.*?`\((\.L_x_\d+)\)", ln)
        if m and where.get(m.group(1), n + 1) <= n:
            out.append((where[m.group(1)], n, n - where[m.group(1)] + 1))
        n += 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("names", nargs="+")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--ops", nargs="*", default=["HGMMA", "FMUL", "FFMA", "FSEL", "MUFU", "ISETP", "LDL", "STL", "BAR", "SYNCS"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    blob, lowered = cubin(args.source, args.names, args.arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(blob)
        f.flush()
        sass = subprocess.run([nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout
    fns = functions(sass)
    for n in args.names:
        lines = fns.get(lowered[n], [])
        body = loops(lines)
        lines = [ln for ln in lines if not re.match(r"\s*\.L_x_\d+:", ln)]
        ops = collections.Counter(m.group(1) for m in map(OPCODE.search, lines) if m)
        print(f"{n}: {len(lines)} instructions; " + ", ".join(f"{o} {sum(c for k, c in ops.items() if k.startswith(o))}"
                                                            for o in args.ops))
        big = [f"{a}-{b} ({k})" for a, b, k in body if k >= 64]
        print("  loops of >= 64 instructions (first-last, count): " + (", ".join(big) or "none"))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, re.sub(r"[^A-Za-z0-9]+", "_", n) + ".sass"), "w") as g:
                g.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
