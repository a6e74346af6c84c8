"""GPU correctness on the real 7B shape (random weights): our bf16 CUDA-graph decode path and the q4 path
against our fp32 eager path (the CPU reference's math, run on the GPU with TF32 off), teacher-forced on
the fp32 greedy continuation of a real-text prompt. Prints next-token agreement over N steps."""

from __future__ import annotations

import argparse
import time

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


def agreement(gen: Generator, prompt: list[int], ref: list[int], ref_logits: list[torch.Tensor]
              ) -> tuple[float, float, float]:
    """Teacher-forced next-token agreement with ``ref``, mean relative logit error, decode tok/s
    (timed after the graph is captured and the kernels compiled)."""
    sync = torch.cuda.synchronize if gen.state.device.type == "cuda" else (lambda: None)
    logits = gen.prefill(prompt).float()
    if gen.step_fn is not None and getattr(gen.step_fn, "use_graph", False):
        gen.step_fn.capture()
    hits, err = 0, 0.0
    sync()
    t0 = time.perf_counter()
    for i, t in enumerate(ref):
        hits += int(torch.argmax(logits)) == t
        err += ((logits.float() - ref_logits[i]).norm() / ref_logits[i].norm()).item()
        logits = gen.step(t)
    sync()
    return hits / len(ref), err / len(ref), len(ref) / (time.perf_counter() - t0)


def reference(gen: Generator, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    logits = gen.prefill(prompt)
    toks, outs = [], []
    for _ in range(steps):
        outs.append(logits.float().clone())
        t = int(torch.argmax(logits))
        toks.append(t)
        logits = gen.step(t)
    return toks, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None, help="a checkpoint (e.g. demo) instead of random weights")
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
    prompt = tok.encode(TEXT)[:200]
    t0 = time.perf_counter()
    g32 = Generator(m32, DecodeState(cfg, 1024, args.device, torch.float32))
    ref, ref_logits = reference(g32, prompt, args.steps)
    print(f"fp32 eager reference: {len(ref)} greedy tokens in {time.perf_counter() - t0:.1f} s")
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
    rows = []
    # the same bf16 weights through the model's eager forward: separates bf16 rounding from the graph path
    eager16 = Generator(m16, DecodeState(cfg, 1024, args.device, torch.bfloat16))
    rows.append(("bf16 weights, eager forward", *agreement(eager16, prompt, ref, ref_logits)))
    for kv in ("bf16", "int8"):
        g16 = make_generator(m16, DecodeState(cfg, 1024, args.device, torch.bfloat16, kv_cache=kv))
        rows.append((f"bf16 weights, graph step, {kv} KV", *agreement(g16, prompt, ref, ref_logits)))
    quantize_linears(m16, 128)
    g4 = make_generator(m16, DecodeState(cfg, 1024, args.device, torch.bfloat16))
    rows.append(("q4 g128 (64 where K needs) + q8 head", *agreement(g4, prompt, ref, ref_logits)))
    print(f"\n{'path':42s} {'agree':>8s} {'rel err':>9s} {'tok/s':>8s}   (vs fp32 eager, {len(ref)} steps, "
          f"{args.preset})")
    for name, a, e, t in rows:
        print(f"{name:42s} {a * 100:7.2f}% {e:9.2e} {t:8.1f}")


if __name__ == "__main__":
    main()
