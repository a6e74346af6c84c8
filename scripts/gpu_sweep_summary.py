#!/usr/bin/env python
"""Best and worst configs per check name from $OUT/gpu_check_kernels.json (after a --sweep run)."""
import json
import os
import sys

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "gpu_check_kernels.json")
d = json.load(open(path))
print(d["meta"])
rs = d["results"]
for name in dict.fromkeys(r["name"] for r in rs):
    sel = sorted([r for r in rs if r["name"] == name], key=lambda r: r["us"])
    for r in sel[:4] + sel[-1:]:
        ok = "PASS" if r["ok"] else "FAIL"
        print(f"{name:<30}{ok:>5}{r['us']:8.2f}{r['gbs']:8.0f} {max(r['errs'].values()):.1e} {r['note']}")
