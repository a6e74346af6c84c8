"""The ``olmo-local`` command line (Typer). Thin commands over the runtime; user errors print one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from olmo_local.errors import OlmoError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Olmo Hybrid models locally: chat, generate, quantize, bench.")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- generate --------------------------------------------------------------------------------
@app.command()
def generate(
    model: str = typer.Argument(..., help="model directory, Hugging Face repo id, or 'demo'"),
    prompt: str = typer.Argument(..., help="the prompt; '-' reads it from stdin"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="tokens to generate at most"),
    temperature: float = typer.Option(0.7, help="0 = greedy"),
    top_k: int = typer.Option(0, help="0 = off"),
    top_p: float = typer.Option(1.0),
    min_p: float = typer.Option(0.0),
    repeat_penalty: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None, help="same seed, same text"),
    raw: bool = typer.Option(False, "--raw", help="skip the chat template; tokenize PROMPT as plain text"),
    system: Optional[str] = typer.Option(None, help="system prompt (chat template mode)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    ctx: Optional[int] = typer.Option(None, help="context size in tokens"),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32 (default: bf16 on GPU)"),
    kv_cache: str = typer.Option("auto", "--kv-cache", help="auto (int8 on CUDA, else bf16), bf16 or int8"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no stats on stderr"),
) -> None:
    """Generate text for one prompt: the text alone on stdout, stats on stderr (pipe-friendly)."""
    from olmo_local.generate import SamplingParams
    from olmo_local.runtime import open_model
    from olmo_local.tokenizer import IncrementalDetokenizer

    if prompt == "-":
        prompt = sys.stdin.read()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed, max_new_tokens=max_new_tokens)
    params.validate()
    rt = open_model(model, device=device, ctx=ctx, dtype=dtype, kv_cache=kv_cache)
    if rt.device.type == "cuda" and not quiet and rt.plan is not None:
        _err("memory plan: " + " · ".join(f"{k} {v}" for k, v in rt.plan.lines()))
    tok = rt.tokenizer
    if raw:
        ids = tok.encode(prompt)
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(msgs, add_generation_prompt=True)
    if not ids:
        raise OlmoError("the prompt is empty")
    detok = IncrementalDetokenizer(tok)
    out = sys.stdout
    for t in rt.generator.stream(ids, params, tok.stop_ids, rt.n_valid):
        piece = detok.push(t)
        if piece:
            out.write(piece)
            out.flush()
    out.write(detok.flush() + "\n")
    out.flush()
    st = rt.generator.stats
    if not quiet:
        _err(f"[prompt {st.prompt_tokens} tok, {st.prefill_tps:.1f} tok/s | generated {st.gen_tokens} tok, "
             f"{st.decode_tps:.1f} tok/s | ttft {st.ttft_s * 1000:.0f} ms | load {rt.load_s:.2f} s | "
             f"stop: {st.stop_reason}]")


# ---- info ------------------------------------------------------------------------------------
@app.command()
def info(
    model: str = typer.Argument(..., help="model directory, Hugging Face repo id, or 'demo'"),
    ctx: Optional[int] = typer.Option(None, help="context size for the memory plan (default: the largest that fits)"),
    device: Optional[str] = typer.Option(None, help="plan memory for this device (cpu or cuda)"),
    kv_cache: str = typer.Option("auto", "--kv-cache", help="auto (int8 on CUDA, else bf16), bf16 or int8"),
) -> None:
    """Config summary, parameter count, bytes read per token and the memory plan."""
    from olmo_local.checkpoint import TensorReader, default_dtype, read_config, resolve_model
    from olmo_local.planner import free_device_memory, kv_bytes_per_token, plan, state_bytes
    from olmo_local.runtime import loaded_weight_bytes, pick_device, resolve_kv_cache

    dev = pick_device(device)
    kv_cache = resolve_kv_cache(kv_cache, dev)
    path = resolve_model(model)
    cfg = read_config(path)
    reader = TensorReader(path)
    weight_bytes = sum(_nbytes(reader, n) for n in reader.names())
    emb = sum(_nbytes(reader, n) for n in reader.names() if n.startswith("model.embed_tokens."))
    q = cfg.extra.get("quantization_config") or {}
    rows = [
        ("model", str(path)),
        ("format", _format_name(q)),
        ("layers", f"{cfg.num_hidden_layers} ({len(cfg.gdn_layers)} Gated DeltaNet, "
                   f"{len(cfg.attn_layers)} attention at {cfg.attn_layers})"),
        ("hidden / intermediate", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
        ("attention heads", f"{cfg.num_attention_heads} x {cfg.head_dim} (kv heads {cfg.num_key_value_heads})"),
        ("GDN heads", f"k {cfg.linear_num_key_heads} x {cfg.linear_key_head_dim}, "
                      f"v {cfg.linear_num_value_heads} x {cfg.linear_value_head_dim}, conv {cfg.linear_conv_kernel_dim}"),
        ("positions", "NoPE" if cfg.nope else f"RoPE theta {cfg.rope_theta:g}"),
        ("vocab", f"{cfg.vocab_size} (tied embeddings: {cfg.tie_word_embeddings})"),
        ("max context", f"{cfg.max_position_embeddings}"),
        ("parameters", f"{cfg.num_params():,}"),
        ("weights on disk", _gib(weight_bytes)),
        ("KV cache per token", f"{kv_bytes_per_token(cfg, kv_cache):,} B ({kv_cache})"),
        ("recurrent + conv state", _gib(state_bytes(cfg))),
        ("bytes read per decode token", f"{_gib(weight_bytes - emb + 2 * state_bytes(cfg))} + KV at depth"),
    ]
    dt = default_dtype(cfg, dev)
    wbytes, largest = loaded_weight_bytes(path, dt)
    try:
        p = plan(cfg, wbytes, free_device_memory(dev), ctx, kv_cache, largest_linear=largest, device_type=dev.type)
        rows.append((f"memory plan on {dev.type}", ""))
        rows += [("  " + k, v) for k, v in p.lines()]
    except OlmoError as e:
        rows.append((f"memory plan on {dev.type}", f"does not fit: {e}"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def _format_name(q: dict) -> str:
    if not q:
        return "bf16/fp (unquantized)"
    if q.get("quant_method") == "bitsandbytes":
        if q.get("load_in_4bit"):
            return f"bitsandbytes {q.get('bnb_4bit_quant_type', 'nf4')}" + (
                " (double quant)" if q.get("bnb_4bit_use_double_quant") else "")
        return "bitsandbytes int8" if q.get("load_in_8bit") else "bitsandbytes"
    return str(q.get("format", q.get("quant_method", "quantized")))


def _nbytes(reader, name: str) -> int:
    import math

    import torch
    dt = reader.dtype(name) or torch.uint8
    return math.prod(reader.shape(name)) * torch.tensor([], dtype=dt).element_size()


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---- init-random ----------------------------------------------------------------------------
@app.command("init-random")
def init_random(
    out: Path = typer.Argument(..., help="directory to create"),
    preset: str = typer.Option("tiny", help="tiny, 1b or 7b"),
    seed: int = typer.Option(0),
    rope_theta: Optional[float] = typer.Option(None, help="enable RoPE with this theta (default NoPE)"),
    force: bool = typer.Option(False, help="overwrite an existing directory"),
) -> None:
    """Write a valid random Olmo Hybrid checkpoint of a preset shape (with the Dolma-2 tokenizer)."""
    from olmo_local.config import preset as make_preset
    from olmo_local.random_init import write_random_checkpoint

    cfg = make_preset(preset, rope_theta=rope_theta)
    write_random_checkpoint(out, cfg, seed=seed, force=force)
    _err(f"wrote random {preset} checkpoint ({cfg.num_params():,} parameters) to {out}")


# ---- commands filled in by their own modules -------------------------------------------------
def _register_optional() -> None:
    """chat, bench, quantize and eval live in their own modules; each registers itself on ``app``."""
    import importlib

    for mod in ("olmo_local.chat", "olmo_local.bench", "olmo_local.quantize_cmd", "olmo_local.eval"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            # a missing optional dependency must not take the other commands down
            name = mod.rsplit(".", 1)[-1].replace("_cmd", "")

            def missing(_e: ModuleNotFoundError = e) -> None:
                raise OlmoError(f"this command needs the Python package {_e.name!r}: pip install {_e.name}")
            app.command(name, help=f"(unavailable: needs {e.name})")(missing)


_register_optional()


def main() -> None:
    import click

    debug = os.environ.get("OLMO_LOCAL_DEBUG") == "1"
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except OlmoError as e:
        _err(f"error: {e}")
        sys.exit(1)
    except click.exceptions.Abort:
        _err("interrupted")
        sys.exit(130)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # never a traceback for the user
        if debug:
            raise
        import torch
        if isinstance(e, torch.cuda.OutOfMemoryError):
            _err("error: out of GPU memory (lower --ctx, use a 4-bit model, or close other GPU programs)")
        else:
            _err(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                 "(set OLMO_LOCAL_DEBUG=1 for details)")
        sys.exit(1)


if __name__ == "__main__":
    # `python -m olmo_local.cli`: run the imported module's app, on which the command modules registered
    from olmo_local.cli import main as _main
    _main()
