#!/usr/bin/env python3
"""Train the small Olmo Hybrid demo model that ships with olmo-local, with its tokenizer and data.

Subcommands:
  tokenizer --out DIR   train the byte-level BPE (cl100k-style pre-tokenisation, 4 special tokens,
                        ChatML chat template) on the training split; print its held-out statistics.
  heldout --out DIR     write the held-out evaluation text (heldout.txt) and its NOTICE.md.
  train --out DIR       tokenizer + data + training + held-out evaluation; writes a checkpoint
                        directory (config.json, generation_config.json, model.safetensors in bf16,
                        tokenizer files, train_report.json).

The model is olmo_local.model.OlmoHybridModel: the very layer code the runtime runs.

Data (tools/demo_data.py): the corpus (--corpus, default ../shared/data/corpus) minus held-out text
(all of jargon.txt and the last 2 % of every other file); documents end with <|endoftext|>; a share
of training rows (--chat-frac) are Shakespeare dialogue rendered as ChatML user/assistant turns.
Token ids are cached as .npy files under --work-dir (default: $TMPDIR/olmo_local_train_demo).

Reproducibility: the same seed gives the same data order and initial weights; on CPU the run is
bit-for-bit repeatable. --time-budget-s bounds the whole command's wall time: the learning-rate
schedule then runs on max(step / steps, elapsed / budget), so a slower machine still anneals
and stops cleanly, writing the checkpoint, by the budget.

Defaults (chosen on an H100/H200 with the validation text, which is held out but not in heldout.txt):
the data is small (5 M training tokens), so the model overfits past ~10-15 epochs; the default
500 steps x 256 x 512 tokens = 65.5 M tokens (~13 epochs) take ~2.5 minutes on one H100 in eager
bf16 (~470 k tokens/s; `--compile layers` gives ~1.3-1.6 M tokens/s after ~35 s of compiling).

Example: python tools/train_demo.py train --out runs/demo --device cuda --time-budget-s 400
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

T_START = time.time()
TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus"
DEFAULT_EVAL_DIR = ROOT / "olmo_local" / "assets" / "eval"


def _ensure_importable() -> None:
    """Make olmo_local (and its kernels/, quant/ subpackages, which live at the top of the repo) importable
    from a plain checkout that was never pip-installed, e.g. on a training machine without internet."""
    for p in (str(TOOLS), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import olmo_local

    for sub in ("kernels", "quant"):
        name = f"olmo_local.{sub}"
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            continue
        except ModuleNotFoundError:
            pass
        init = ROOT / sub / "__init__.py"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(ROOT / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(olmo_local, sub, mod)


_ensure_importable()

import numpy as np  # noqa: E402

import demo_data as dd  # noqa: E402


def log(msg: str) -> None:
    now = time.strftime("%H:%M:%S")
    print(f"[{now} +{time.time() - T_START:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# model shapes

PRESETS = {
    # the shipped demo: 5.58 M parameters, 11.2 MB in bf16 (+0.2 MB tokenizer)
    "demo": dict(vocab=8192, hidden=192, layers=8, heads=3, intermediate=512, gdn_heads=3,
                 gdn_key_dim=48, gdn_value_dim=96),
    # for tests: a few hundred thousand parameters
    "tiny": dict(vocab=512, hidden=64, layers=4, heads=2, intermediate=128, gdn_heads=2,
                 gdn_key_dim=16, gdn_value_dim=32),
}


def model_config(args, special: dict[str, int], n_vocab: int) -> dict:
    from olmo_local.config import OlmoHybridConfig

    vocab = ((n_vocab + 127) // 128) * 128  # embedding rows padded to a multiple of 128
    L = args.layers
    layer_types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(L)]
    if "full_attention" not in layer_types:
        layer_types[-1] = "full_attention"
    d = {
        "architectures": ["OlmoHybridForCausalLM"],
        "model_type": "olmo_hybrid",
        "vocab_size": vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": L,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "head_dim": args.hidden // args.heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "layer_types": layer_types,
        "linear_num_key_heads": args.gdn_heads,
        "linear_num_value_heads": args.gdn_heads,
        "linear_key_head_dim": args.gdn_key_dim,
        "linear_value_head_dim": args.gdn_value_dim,
        "linear_conv_kernel_dim": 4,
        "linear_allow_neg_eigval": True,
        "rope_parameters": {"rope_theta": None},  # NoPE, spelled the way transformers honours (P1)
        "eos_token_id": [special[dd.EOT], special[dd.IM_END]],
        "pad_token_id": special[dd.PAD],
        "bos_token_id": None,
        "dtype": "bfloat16",
    }
    OlmoHybridConfig.from_dict(d)  # validate with the runtime's own rules
    return d


# ---------------------------------------------------------------------------------------------
# data


class Data:
    """Token streams of the training split (+ chat samples) and of the held-out text."""

    def __init__(self, text: np.ndarray, chat: np.ndarray, chat_starts: np.ndarray, heldout: np.ndarray,
                 val: np.ndarray):
        self.text, self.chat, self.chat_starts, self.heldout, self.val = text, chat, chat_starts, heldout, val


def load_split(args):
    texts = dd.read_corpus(Path(args.corpus))
    return texts, dd.split_corpus(texts, args.holdout_frac)


def get_tokenizer(args, sp):
    if getattr(args, "tokenizer", None):
        tok = dd.load_tokenizer(Path(args.tokenizer))
        log(f"tokenizer from {args.tokenizer}: {tok.get_vocab_size()} ids")
        return tok
    t = time.time()
    tok = dd.train_tokenizer(dd.training_documents(sp), args.vocab)
    log(f"trained tokenizer: {tok.get_vocab_size()} ids in {time.time() - t:.1f}s")
    return tok


def prepare_data(args, texts, sp, tok) -> Data:
    import tempfile

    special = dd.special_ids(tok)
    corpus_fp = dd.fingerprint(*[f"{n}:{len(t)}:{dd.fingerprint(t)}" for n, t in sorted(texts.items())])
    key = dd.fingerprint("v2", tok.to_str(), corpus_fp, repr(args.holdout_frac), str(args.seed))
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "olmo_local_train_demo") / key
    names = ["text", "chat", "chat_starts", "heldout", "val"]
    if all((work / f"{n}.npy").is_file() for n in names):
        arrs = [np.load(work / f"{n}.npy") for n in names]
        log(f"token ids from cache {work}")
    else:
        t = time.time()
        docs = dd.training_documents(sp)
        text, _ = dd.encode_docs(tok, docs, special[dd.EOT])
        chats = dd.chat_samples(sp.train["shakespeare.txt"], seed=args.seed) if "shakespeare.txt" in sp.train else []
        chat, chat_starts = dd.encode_docs(tok, chats, special[dd.EOT])
        heldout = np.asarray(tok.encode(dd.heldout_text(sp), add_special_tokens=False).ids, dtype=text.dtype)
        val = np.asarray(tok.encode(dd.validation_text(sp), add_special_tokens=False).ids, dtype=text.dtype)
        arrs = [text, chat, chat_starts, heldout, val]
        work.mkdir(parents=True, exist_ok=True)
        for n, a in zip(names, arrs):  # atomic: concurrent runs may share the cache
            tmp = work / f".{n}.{os.getpid()}.npy"
            np.save(tmp, a)
            os.replace(tmp, work / f"{n}.npy")
        log(f"tokenized in {time.time() - t:.1f}s ({len(docs)} documents, {len(chats)} chat samples); "
            f"cached in {work}")
    data = Data(*arrs)
    log(f"training tokens: {len(data.text):,} text + {len(data.chat):,} chat ({len(data.chat_starts):,} samples); "
        f"held-out tokens: {len(data.heldout):,} (+ {len(data.val):,} validation)")
    return data


class Batches:
    """Seeded random rows of seq_len + 1 tokens: with probability chat_frac a row starts at the start
    of a chat sample (and runs on into the following ones), else at a random offset of the text."""

    def __init__(self, data: Data, seq_len: int, batch: int, chat_frac: float, seed: int):
        self.d, self.L, self.B = data, seq_len + 1, batch
        self.chat_frac = chat_frac if len(data.chat) > self.L else 0.0
        self.rng = np.random.default_rng(seed)
        if len(data.text) <= self.L:
            raise SystemExit(f"training text has only {len(data.text)} tokens, fewer than seq_len + 1")

    def next(self) -> np.ndarray:
        r = self.rng
        is_chat = r.random(self.B) < self.chat_frac
        text_off = r.integers(0, len(self.d.text) - self.L + 1, self.B)
        if self.chat_frac > 0:
            chat_off = self.d.chat_starts[r.integers(0, len(self.d.chat_starts), self.B)]
            chat_off = np.minimum(chat_off, len(self.d.chat) - self.L)
        else:
            chat_off = np.zeros(self.B, dtype=np.int64)
        ar = np.arange(self.L)
        rows = np.where(is_chat[:, None], self.d.chat[(chat_off[:, None] + ar) % max(len(self.d.chat), 1)],
                        self.d.text[text_off[:, None] + ar])
        return rows.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# training


def lr_at(progress: float, peak: float, warmup_frac: float, final_frac: float) -> float:
    if progress < warmup_frac:
        return peak * progress / warmup_frac
    p = min(1.0, (progress - warmup_frac) / max(1e-9, 1.0 - warmup_frac))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _eager():
    """Run compiled layers eagerly (evaluation, sampling: other shapes, no recompiles)."""
    import contextlib

    import torch

    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def evaluate(model, ids: np.ndarray, seq_len: int, batch: int, device, autocast) -> tuple[float, int]:
    """Mean next-token loss over ids in non-overlapping windows of seq_len + 1 tokens (each window's
    first token is context only; the last partial window is included)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    L = seq_len + 1
    starts = list(range(0, max(1, len(ids) - 1), seq_len))
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad(), autocast(), _eager():
        for i in range(0, len(starts), batch):
            chunk = [ids[s:s + L] for s in starts[i:i + batch]]
            chunk = [c for c in chunk if len(c) > 1]
            x = torch.zeros((len(chunk), L), dtype=torch.long)
            y = torch.full((len(chunk), L - 1), -100, dtype=torch.long)
            for j, c in enumerate(chunk):
                c = torch.from_numpy(c.astype(np.int64))
                x[j, :len(c)] = c
                y[j, :len(c) - 1] = c[1:]
            logits = model(x[:, :-1].to(device))
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                     ignore_index=-100, reduction="sum")
            count += int((y != -100).sum())
    model.train()
    return float(total) / max(count, 1), count


def sample(model, tok, prompt: str, device, max_new: int = 48, seed: int = 0, temperature: float = 0.7,
           top_k: int = 40) -> str:
    """Sample a continuation (no cache: a full forward per token; the model is tiny)."""
    import torch

    special = dd.special_ids(tok)
    stops = {special[dd.EOT], special[dd.IM_END]}
    ids = tok.encode(prompt, add_special_tokens=False).ids
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    model.eval()
    with torch.no_grad(), _eager():
        for _ in range(max_new):
            x = torch.tensor([ids + out], dtype=torch.long, device=device)
            logits = model(x)[0, -1].float().cpu()
            logits[tok.get_vocab_size():] = -float("inf")
            v, i = logits.topk(top_k)
            p = torch.softmax(v / temperature, -1)
            nxt = int(i[torch.multinomial(p, 1, generator=gen)])
            if nxt in stops:
                break
            out.append(nxt)
    model.train()
    return tok.decode(out, skip_special_tokens=False)


def cmd_train(args) -> None:
    import contextlib

    import torch
    import torch.nn.functional as F

    from olmo_local.config import OlmoHybridConfig
    from olmo_local.model import OlmoHybridModel

    budget = args.time_budget_s if args.time_budget_s and args.time_budget_s > 0 else None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_flush_denormal(True)  # tiny decays underflow; denormal arithmetic is very slow on CPU
    log(f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))

    texts, sp = load_split(args)
    tok = get_tokenizer(args, sp)
    special = dd.special_ids(tok)
    data = prepare_data(args, texts, sp, tok)
    n_vocab = tok.get_vocab_size()
    uni_ppl = dd.unigram_perplexity(data.text, data.heldout[1:], n_vocab)
    log(f"unigram perplexity of the held-out text (add-one, fitted on the training text): {uni_ppl:.1f}")

    cfg_dict = model_config(args, special, n_vocab)
    cfg = OlmoHybridConfig.from_dict(cfg_dict)
    model = OlmoHybridModel(cfg)
    model.init_weights_(args.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({n_params * 2 / 1e6:.2f} MB in bf16), d={cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers {['G' if t == 'linear_attention' else 'A' for t in cfg.layer_types]}, "
        f"vocab {cfg.vocab_size}")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() == 2 and "embed" not in name else no_decay).append(p)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **fused)

    use_bf16 = device.type == "cuda" and not args.no_bf16

    def autocast():
        if use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if args.compile == "layers":  # each layer compiled on its own: same-shaped layers share the work
        for layer in model.layers:
            layer.compile()
    fwd = torch.compile(model) if args.compile == "model" else model

    batches = Batches(data, args.seq_len, args.batch, args.chat_frac, args.seed)
    tokens_per_step = args.batch * args.seq_len
    # time kept back for the final evaluation, sampling and saving
    reserve = args.reserve_s
    t_loop = time.time()
    train_budget = None if budget is None else budget - (t_loop - T_START) - reserve
    if train_budget is not None and train_budget <= 0:
        raise SystemExit(f"--time-budget-s {budget} leaves no time for training")
    log(f"training: up to {args.steps} steps of {args.batch} x {args.seq_len} tokens "
        f"({args.steps * tokens_per_step / 1e6:.1f} M tokens), lr {args.lr} cosine, warmup {args.warmup_frac:.0%}"
        + (f", time budget {budget:.0f}s (training {train_budget:.0f}s)" if budget else "")
        + (", bf16 autocast" if use_bf16 else ", fp32") + (f", torch.compile ({args.compile})" if args.compile != "none" else ""))

    losses: list[tuple[int, float]] = []
    val_curve: list[tuple[int, float]] = []
    acc = torch.zeros((), device=device)
    acc_n = 0
    step = 0
    t_log = time.time()
    tok_log = 0
    first_loss = None
    stop_reason = "steps"
    while step < args.steps:
        elapsed = time.time() - t_loop
        progress = step / args.steps
        if train_budget is not None:
            if elapsed >= train_budget:
                stop_reason = "time budget"
                break
            progress = max(progress, elapsed / train_budget)
        lr = lr_at(progress, args.lr, args.warmup_frac, args.final_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = torch.from_numpy(batches.next())
        if device.type == "cuda":
            rows = rows.pin_memory().to(device, non_blocking=True)
        x, y = rows[:, :-1], rows[:, 1:]
        with autocast():
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        acc += loss.detach()
        acc_n += 1
        tok_log += tokens_per_step
        if step % args.log_every == 0 or step == args.steps or step == 1:
            mean = float(acc) / acc_n
            if not math.isfinite(mean):
                raise SystemExit(f"loss is {mean} at step {step}: lower --lr")
            if first_loss is None:
                first_loss = mean
            losses.append((step, mean))
            now = time.time()
            tps = tok_log / max(now - t_log, 1e-9)
            log(f"step {step:6d}  loss {mean:.4f}  lr {lr:.2e}  {tps / 1e3:8.1f} k tok/s  "
                f"tokens {step * tokens_per_step / 1e6:7.1f} M  progress {progress:5.1%}")
            if args.eval_every and step % args.eval_every == 0 and len(data.val) > 1:
                vl, _ = evaluate(model, data.val, args.seq_len, args.eval_batch, device, autocast)
                val_curve.append((step, vl))
                log(f"step {step:6d}  validation loss {vl:.4f}")
                t_log = time.time()
            acc.zero_()
            acc_n, t_log, tok_log = 0, now, 0
    if acc_n:
        losses.append((step, float(acc) / acc_n))
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_loop
    log(f"stopped after {step} steps ({stop_reason}), {step * tokens_per_step / 1e6:.1f} M tokens in "
        f"{train_s:.0f}s ({step * tokens_per_step / max(train_s, 1e-9) / 1e3:.1f} k tok/s)")

    # held-out evaluation (the same text that ships as olmo_local/assets/eval/heldout.txt)
    t = time.time()
    ev_bytes = len(dd.heldout_text(sp).encode("utf-8"))
    ho_loss, ho_n = evaluate(model, data.heldout, args.seq_len, args.eval_batch, device, autocast)
    ho_ppl = math.exp(ho_loss)
    bpb = ho_loss * len(data.heldout) / ev_bytes / math.log(2)
    log(f"held-out: loss {ho_loss:.4f}, perplexity {ho_ppl:.2f} over {ho_n:,} tokens "
        f"({args.seq_len}-token windows), {bpb:.3f} bits/byte; unigram perplexity {uni_ppl:.1f} "
        f"({eval_time(t)})")
    long_win = 4 * args.seq_len  # NoPE: how the model does past the trained length
    ho_long, _ = evaluate(model, data.heldout, long_win, max(1, args.eval_batch // 4), device, autocast)
    log(f"held-out: loss {ho_long:.4f}, perplexity {math.exp(ho_long):.2f} in {long_win}-token windows")

    samples = {}
    for name, prompt in [
        ("chat", dd.render_chat([("user", "What news from the court, good sir?")], add_generation_prompt=True)),
        ("text", "It is a truth universally acknowledged, that"),
    ]:
        samples[name] = sample(model, tok, prompt, device, seed=args.seed)
        log(f"sample ({name}): {prompt!r} -> {samples[name]!r}")

    report = {
        "params": n_params,
        "steps": step,
        "stop_reason": stop_reason,
        "tokens_seen": step * tokens_per_step,
        "train_seconds": round(train_s, 1),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "chat_frac": args.chat_frac,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "first_loss": first_loss,
        "final_train_loss": losses[-1][1] if losses else None,
        "loss_curve": losses,
        "validation_curve": val_curve,
        "heldout": {"file": "olmo_local/assets/eval/heldout.txt", "tokens": int(len(data.heldout)),
                    "bytes": ev_bytes, "window": args.seq_len, "loss": ho_loss, "perplexity": ho_ppl,
                    "bits_per_byte": bpb, "unigram_perplexity": uni_ppl,
                    f"loss_{long_win}_window": ho_long, f"perplexity_{long_win}_window": math.exp(ho_long)},
        "samples": samples,
    }
    write_checkpoint(Path(args.out), cfg_dict, model, tok, report, args)
    log(f"wrote {args.out} ({dir_size(Path(args.out)) / 1e6:.2f} MB); total wall {time.time() - T_START:.0f}s")


def eval_time(t: float) -> str:
    return f"{time.time() - t:.1f}s"


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def write_checkpoint(out: Path, cfg_dict: dict, model, tok, report: dict, args) -> None:
    import tempfile

    import torch

    from olmo_local.checkpoint import save_checkpoint

    tensors = {k: v.detach().float().cpu() for k, v in model.hf_state_dict().items()}
    with tempfile.TemporaryDirectory() as td:
        dd.save_tokenizer(tok, Path(td), model_max_length=args.max_position_embeddings)
        extra = {f.name: f.read_text(encoding="utf-8") for f in sorted(Path(td).iterdir())}
    gen_cfg = {"eos_token_id": cfg_dict["eos_token_id"], "pad_token_id": cfg_dict["pad_token_id"],
               "bos_token_id": None, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40}
    extra["generation_config.json"] = json.dumps(gen_cfg, indent=2) + "\n"
    extra["train_report.json"] = json.dumps(report, indent=2) + "\n"
    save_checkpoint(out, cfg_dict, tensors, dtype=torch.bfloat16, extra_files=extra)
    out.chmod(0o755)  # the atomic temp dir it was built in is private
    for f in out.iterdir():
        f.chmod(0o644)


# ---------------------------------------------------------------------------------------------
# other subcommands


def cmd_tokenizer(args) -> None:
    texts, sp = load_split(args)
    tok = get_tokenizer(args, sp)
    dd.save_tokenizer(tok, Path(args.out))
    special = dd.special_ids(tok)
    log(f"wrote {args.out}: {tok.get_vocab_size()} ids, special {special}")
    eot = special[dd.EOT]
    train_ids, _ = dd.encode_docs(tok, dd.training_documents(sp), eot)
    h = dd.heldout_text(sp)
    ids = np.asarray(tok.encode(h, add_special_tokens=False).ids)
    log(f"held-out text: {len(h.encode()):,} bytes -> {len(ids):,} tokens "
        f"({len(h.encode()) / len(ids):.2f} bytes/token); training text {len(train_ids):,} tokens")
    log(f"unigram perplexity of the held-out text (add-one, fitted on the training text): "
        f"{dd.unigram_perplexity(train_ids, ids[1:], tok.get_vocab_size()):.1f}")


def cmd_heldout(args) -> None:
    texts, sp = load_split(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h = dd.heldout_text(sp)
    (out / "heldout.txt").write_text(h, encoding="utf-8")
    (out / "NOTICE.md").write_text(dd.notice_text(dd.heldout_sources(sp), args.holdout_frac), encoding="utf-8")
    log(f"wrote {out / 'heldout.txt'} ({len(h.encode()):,} bytes) and NOTICE.md")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="folder of *.txt files (default: %(default)s)")
        p.add_argument("--holdout-frac", type=float, default=0.02,
                       help="tail of every corpus file held out for evaluation (default: %(default)s)")

    p = sub.add_parser("tokenizer", help="train the tokenizer")
    common(p)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=PRESETS["demo"]["vocab"], help="ids in all, specials included")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("heldout", help="write heldout.txt + NOTICE.md")
    common(p)
    p.add_argument("--out", default=str(DEFAULT_EVAL_DIR))
    p.set_defaults(func=cmd_heldout)

    p = sub.add_parser("train", help="train the demo model")
    common(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write (replaced if present)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default: %(default)s)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    for k in PRESETS["demo"]:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"override the preset's {k}")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer dir/file instead of training one")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-frac", type=float, default=0.03)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.5)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--chat-frac", type=float, default=0.25, help="share of rows that are chat samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=400.0,
                   help="wall-clock budget of the whole command; 0 = none (default: %(default)s)")
    p.add_argument("--reserve-s", type=float, default=20.0,
                   help="part of the budget kept for evaluation and saving (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--max-position-embeddings", type=int, default=4096)
    p.add_argument("--work-dir", default=None, help="token-id cache (default: $TMPDIR/olmo_local_train_demo)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--compile", choices=["none", "layers", "model"], default="none",
                   help="torch.compile each layer or the whole model (CUDA; default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validation loss (held-out text that is not in heldout.txt) every N steps")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA too")
    p.set_defaults(func=cmd_train)

    args = ap.parse_args(argv)
    if args.cmd == "train":
        for k, v in PRESETS[args.preset].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    args.func(args)


if __name__ == "__main__":
    main()
