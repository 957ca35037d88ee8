"""Table of an A/B run by bench/device_ab.sh: TFLOP/s of the base tree (two runs, before and after)
and of the new tree, per case, and new / mean(base); flags every case under 0.98x.

    python3 bench/ab_table.py runs/ab
"""

import json
import sys
from pathlib import Path


def rows(path: Path):
    if not path.is_file():
        return {}
    out = {}
    for r in json.loads(path.read_text())["rows"]:
        if r.get("provider", "").startswith(("flashcupy", "fc-")) and r.get("tflops") and r.get("status", "ok") == "ok":
            key = (r["provider"], r["mode"], r["dtype"], r["head_dim"], r["seqlen"], bool(r["causal"]))
            out[key] = r["tflops"]
    return out


def main(d: str) -> int:
    d = Path(d)
    lines, worst = [], []
    for kind in ("quick", "simt", "drop"):
        b1, new, b2 = (rows(d / f"{kind}-{t}.json") for t in ("base1", "new", "base2"))
        for key in sorted(set(new) | set(b1)):
            base = [x[key] for x in (b1, b2) if key in x]
            if key not in new or not base:
                lines.append(f"{' '.join(map(str, key)):<48} missing in {'new' if key not in new else 'base'}")
                continue
            mean = sum(base) / len(base)
            ratio = new[key] / mean
            spread = (max(base) - min(base)) / mean
            flag = "  <0.98" if ratio < 0.98 else ""
            lines.append(f"{' '.join(map(str, key)):<48} base {mean:8.2f} (+-{spread * 50:4.1f}%)  new {new[key]:8.2f}  "
                         f"{ratio:5.3f}x{flag}")
            worst.append((ratio, key))
    print("\n".join(lines))
    if worst:
        worst.sort()
        print(f"== {len(worst)} cases; lowest new/base {worst[0][0]:.3f} ({' '.join(map(str, worst[0][1]))}); "
              f"{sum(r < 0.98 for r, _ in worst)} under 0.98")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/ab"))
