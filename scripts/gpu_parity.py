"""GPU correctness: our bf16 paths (eager forward, CUDA-graph decode step with bf16 / int8 KV, q4) against our
fp32 eager path (the CPU reference's math, run on the same device with TF32 off), teacher-forced on the fp32
greedy continuation of real-text prompts. Prints next-token agreement over N steps per path, the misses whose
fp32 reference was a near-tie (its top-1 minus top-2 logit), and the mean relative logit error.

    python scripts/gpu_parity.py [--steps 256]                      # the 7B shape, random weights, one prompt
    python scripts/gpu_parity.py --model demo --prompts 16 --hf     # a trained checkpoint, held-out prompts,
                                                                    # and transformers fp32 / bf16 beside ours
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from olmo_local.config import preset
from olmo_local.generate import Generator
from olmo_local.model import OlmoHybridModel
from olmo_local.runtime import make_generator
from olmo_local.state import DecodeState
from olmo_local.tokenizer import Tokenizer

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters. ") * 3


def quantize_linears(model: OlmoHybridModel, group_size: int = 128) -> None:
    from olmo_local.quant.formats import quantize_q4, quantize_q8
    from olmo_local.quant.linear import DenseLinear, Q4Linear, Q8Linear
    for layer in model.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, DenseLinear) and not name.endswith("ab"):
                g = next(x for x in (group_size, 64, 32) if mod.in_features % x == 0)
                q = Q4Linear(**quantize_q4(mod.weight.detach().float(), g), group_size=g)
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], q)
    if model.lm_head is not None:
        model.lm_head = Q8Linear(**quantize_q8(model.lm_head.weight.detach().float()))
    from olmo_local.quant.linear import tile_q4_layers

    tile_q4_layers(model)  # the layout load_model gives q4 layers on a GPU


def agreement(gen, prompt: list[int], ref: list[int], ref_logits: list[torch.Tensor]
              ) -> tuple[list[bool], float, float]:
    """Teacher-forced next-token hits against ``ref`` (one per step), mean relative logit error, decode
    tok/s (timed after the graph is captured and the kernels compiled). ``gen``: a Generator or an
    HFEngine (prefill / step)."""
    state = getattr(gen, "state", None)
    dev = state.device if state is not None else gen.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if state is not None:
        state.reset()
    else:
        gen.reset()
    logits = gen.prefill(prompt).float()
    step_fn = getattr(gen, "step_fn", None)
    if step_fn is not None and getattr(step_fn, "use_graph", False) and getattr(step_fn, "graphs", None) is None:
        step_fn.capture()
    hits, err = [], 0.0
    sync()
    t0 = time.perf_counter()
    for i, t in enumerate(ref):
        hits.append(int(torch.argmax(logits)) == t)
        err += ((logits.float() - ref_logits[i]).norm() / ref_logits[i].norm()).item()
        logits = gen.step(t)
    sync()
    return hits, err / len(ref), len(ref) / (time.perf_counter() - t0)


def reference(gen: Generator, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    gen.state.reset()
    logits = gen.prefill(prompt)
    toks, outs = [], []
    for _ in range(steps):
        outs.append(logits.float().clone())
        t = int(torch.argmax(logits))
        toks.append(t)
        logits = gen.step(t)
    return toks, outs


def margin(logits: torch.Tensor) -> float:
    """The reference's top-1 minus top-2 logit: how close the greedy choice was to a tie."""
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def heldout_prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from evenly spaced places in the held-out evaluation text
    (never seen by the demo model in training)."""
    ids = tok.encode(HELDOUT.read_text(encoding="utf-8"))
    stride = (len(ids) - length) // max(n, 1)
    return [ids[i * stride: i * stride + length] for i in range(n)]


HELDOUT = Path(__file__).resolve().parent.parent / "olmo_local" / "assets" / "eval" / "heldout.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None, help="a checkpoint (e.g. demo) instead of random weights")
    ap.add_argument("--prompts", type=int, default=1,
                    help="how many prompts (1: the fixed Austen prompt; more: held-out text)")
    ap.add_argument("--hf", action="store_true",
                    help="also transformers' OlmoHybridForCausalLM in fp32 and bf16 on the same weights")
    ap.add_argument("--no-q4", action="store_true", help="skip the q4 row")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.model:  # a real checkpoint: fp32 and bf16 copies loaded from it
        from olmo_local.checkpoint import load_model, resolve_model
        path = resolve_model(args.model)
        tok = Tokenizer.from_dir(path)
        m32 = load_model(path, args.device, torch.float32)
        cfg = m32.config
        args.preset = str(args.model)
    else:
        cfg = preset(args.preset)
        tok = Tokenizer.from_dir("olmo_local/assets/dolma2")
        m32 = OlmoHybridModel(cfg, device=args.device, dtype=torch.float32).eval()
        m32.init_weights_(0)
    prompts = [tok.encode(TEXT)[:200]] if args.prompts == 1 else heldout_prompts(tok, args.prompts, 200)
    ctx = 200 + args.steps + 8
    t0 = time.perf_counter()
    g32 = Generator(m32, DecodeState(cfg, ctx, args.device, torch.float32))
    refs = [reference(g32, p, args.steps) for p in prompts]
    margins = [[margin(x) for x in lg] for _, lg in refs]
    print(f"fp32 eager reference: {len(prompts)} x {args.steps} greedy tokens in {time.perf_counter() - t0:.1f} s")
    rows = []

    def measure(name: str, gen) -> None:
        hits, errs, tps = [], [], []
        for p, (ref, lg) in zip(prompts, refs):
            h, e, t = agreement(gen, p, ref, lg)
            hits.append(h)
            errs.append(e)
            tps.append(t)
        rows.append((name, hits, sum(errs) / len(errs), sum(tps) / len(tps)))

    if args.hf:
        from olmo_local.bench_hf import HFEngine, build_hf
        for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            hf = build_hf(m32, "hf", torch.device(args.device), dt)
            measure(f"transformers {label}, eager (its cache)", HFEngine(hf, "hf", torch.device(args.device)))
            del hf
    if args.model:
        m16 = load_model(path, args.device, torch.bfloat16)
    else:
        m16 = OlmoHybridModel(cfg, device=args.device, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            for (n32, p32), (n16, p16) in zip(m32.named_parameters(), m16.named_parameters()):
                assert n32 == n16
                p16.copy_(p32)
    del m32, g32
    if args.device == "cuda":
        torch.cuda.empty_cache()
    # the same bf16 weights through the model's eager forward: separates bf16 rounding from the graph path
    measure("bf16 weights, eager forward", Generator(m16, DecodeState(cfg, ctx, args.device, torch.bfloat16)))
    for kv in ("bf16", "int8"):
        measure(f"bf16 weights, graph step, {kv} KV",
                make_generator(m16, DecodeState(cfg, ctx, args.device, torch.bfloat16, kv_cache=kv)))
    if not args.no_q4:
        quantize_linears(m16, 128)
        measure("q4 g128 (64 where K needs) + q8 head",
                make_generator(m16, DecodeState(cfg, ctx, args.device, torch.bfloat16)))
    n = len(prompts) * args.steps
    print(f"\n{'path':42s} {'agree':>8s} {'per prompt':>15s} {'miss':>5s} {'m<0.1':>6s} {'m<0.5':>6s} "
          f"{'rel err':>9s} {'tok/s':>8s}   (vs our fp32 eager: {len(prompts)} prompts x {args.steps} "
          f"teacher-forced steps, {args.preset})")
    for name, hits, e, t in rows:
        flat = [(h, m) for hs, ms in zip(hits, margins) for h, m in zip(hs, ms)]
        miss = [m for h, m in flat if not h]
        per = [sum(h) / len(h) * 100 for h in hits]
        print(f"{name:42s} {sum(h for h, _ in flat) / n * 100:7.2f}% {min(per):6.1f}-{max(per):5.1f}% "
              f"{len(miss):5d} {sum(m < 0.1 for m in miss):6d} {sum(m < 0.5 for m in miss):6d} {e:9.2e} {t:8.1f}")
    allm = [m for ms in margins for m in ms]
    print(f"reference margins (top-1 minus top-2 logit): {sum(m < 0.1 for m in allm)} of {n} steps < 0.1, "
          f"{sum(m < 0.5 for m in allm)} < 0.5; miss columns: misses whose reference margin was below that")


if __name__ == "__main__":
    main()
