"""`olmo-local quantize` end to end (q4 / q8 / nf4), atomic writes, overwrite rules, corrupt quantized
files, bitsandbytes checkpoints written the way transformers writes them, and q8 closeness to bf16."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_ref import tiny_config
from olmo_local.checkpoint import TensorReader, load_model, write_safetensors
from olmo_local.errors import OlmoError
from olmo_local.quantize_cmd import QuantOptions, write_quantized
from olmo_local.state import DecodeState

bnb = pytest.importorskip("bitsandbytes")

# every in_features a multiple of 128: q4 g128 and nf4 apply to every decoder linear
SHAPE = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=2,
             linear_key_head_dim=32, linear_value_head_dim=64, max_position_embeddings=1024,
             eos_token_id=[256], pad_token_id=259)
EVAL_ARGS = ("--tokens", "256", "--window", "64")


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer: ids 0..255 are bytes, 256..259 specials (ids 260.. are embedding padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 258]}))


def make_source(path: Path, seed: int = 0, **kw) -> Path:
    """A bf16 checkpoint with init-like random weights (olmo_local.random_init), except a larger
    embedding (std 0.5) and lm_head (std 0.3) so that next-token distributions are peaked (top-1 prob
    ~0.4) while the network stays well conditioned: 0.1% relative weight noise moves the logits by
    ~0.2% of their range. (Fully random transformer-style weights are chaotic through the delta rule:
    there 0.1% noise moves logits by 8% and no quantization bound means anything.)"""
    from olmo_local.random_init import random_tensors

    cfg = tiny_config(**{**SHAPE, **kw})
    t = dict(random_tensors(cfg, seed=seed))
    t["model.embed_tokens.weight"] = (t["model.embed_tokens.weight"].float() * 25).bfloat16()
    if "lm_head.weight" in t:
        t["lm_head.weight"] = (t["lm_head.weight"].float() * 15).bfloat16()
    path.mkdir(parents=True)
    write_safetensors(path, t)
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "bf16")


@pytest.fixture(scope="module")
def src_tied(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "tied", seed=5, tie_word_embeddings=True)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (as the console script does); returns (exit code, stdout, stderr)."""
    from olmo_local.cli import main

    old = sys.argv
    sys.argv = ["olmo-local", *map(str, args)]
    try:
        main()
        rc = 0
    except SystemExit as e:
        rc = e.code or 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    code = "import sys; from olmo_local.cli import main; sys.argv[0] = 'olmo-local'; main()"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("fmt", ["q4", "q8", "nf4"])
def test_quantize_end_to_end(fmt, src, tmp_path, capsys):
    dst = tmp_path / f"m-{fmt}"
    extra = ("--baseline", "nf4") if fmt == "q4" else ()
    rc, out, err = cli(capsys, "quantize", src, dst, "--format", fmt, *EVAL_ARGS, *extra)
    assert rc == 0, err
    assert "perplexity" in out and "KLD" in out  # the table
    for f in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json",
              "quant_report.json"):
        assert (dst / f).is_file(), f
    assert not list(tmp_path.glob(".*"))  # no temp dir left beside DST
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    if fmt == "nf4":  # what transformers writes for load_in_4bit
        assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
        assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is False
        assert "lm_head" in qc["llm_int8_skip_modules"]
    else:
        assert qc["quant_method"] == "olmo-local" and qc["format"] == fmt
        assert qc["lm_head"] == "q8" and qc["embed"] == "q8"
    if fmt == "q4":
        assert qc["group_size"] == 128
    rep = json.loads((dst / "quant_report.json").read_text())
    bpw = rep["bits_per_weight"]["linear"]
    assert {"q4": 4.25 <= bpw < 4.4, "q8": 8.0 <= bpw < 8.3, "nf4": 4.5 <= bpw < 4.7}[fmt], bpw
    assert rep["peak_rss_mb"]["quantize"] > 0 and rep["size_bytes"]["quantized"] < rep["size_bytes"]["source"]
    rows = rep["eval"]["rows"]
    assert rows[0]["kld_mean"] is None and rows[0]["ppl"] > 1
    assert len(rows) == (3 if fmt == "q4" else 2)
    for r in rows[1:]:
        for k in ("ppl", "kld_mean", "kld_p99", "same_top_pct", "bits_per_weight_linear",
                  "bits_per_weight_overall", "size_bytes"):
            assert r[k] is not None, k
        assert 0 <= r["kld_mean"] <= r["kld_p99"] and 0 <= r["same_top_pct"] <= 100
    assert rep["eval"]["scored_tokens"] == 4 * 63
    if fmt == "q4":
        assert rows[2]["model"].startswith("nf4") and rows[2]["bits_per_weight_linear"] > bpw
    # the result runs with the ordinary commands
    rc, out, err = cli(capsys, "generate", dst, "Hello", "--temperature", "0", "-n", "6", "--device", "cpu")
    assert rc == 0, err
    rc, out, err = cli(capsys, "eval", dst, "--reference", src, *EVAL_ARGS, "--device", "cpu")
    assert rc == 0, err
    assert "perplexity" in out
    rc, out, err = cli(capsys, "info", dst)
    assert rc == 0 and fmt in out.split("format", 1)[1].splitlines()[0]


def test_eval_of_quantized_matches_report(src, tmp_path, capsys):
    dst = tmp_path / "q8"
    assert cli(capsys, "quantize", src, dst, "--format", "q8", *EVAL_ARGS)[0] == 0
    row = json.loads((dst / "quant_report.json").read_text())["eval"]["rows"][1]
    rc, out, err = cli(capsys, "eval", dst, "-r", src, *EVAL_ARGS, "--device", "cpu",
                       "--json", tmp_path / "e.json")
    assert rc == 0, err
    got = json.loads((tmp_path / "e.json").read_text())["rows"][1]
    assert got["ppl"] == pytest.approx(row["ppl"], rel=1e-9)
    assert got["kld_mean"] == pytest.approx(row["kld_mean"], rel=1e-6, abs=1e-12)


def test_q8_group_layout_and_what_the_report_measures(src, tmp_path, capsys):
    """q8 writes fp16 scales per group of 128 inputs (8.125 bits per weight), and the quality report runs
    the reference and the q8 model with the same fp32 compute on CPU: the q8 model's logits are those of
    a dense fp32 model holding its dequantized weights, so KLD / same-top measure the weights alone."""
    from olmo_local.quant.formats import dequantize_q8

    dst = tmp_path / "q8"
    rc, out, err = cli(capsys, "quantize", src, dst, "--format", "q8", *EVAL_ARGS, "--device", "cpu")
    assert rc == 0, err
    rep = json.loads((dst / "quant_report.json").read_text())
    assert rep["group_size"] == 128 and set(rep["linear_formats"]) == {"q8 g128"}
    assert rep["bits_per_weight"]["linear"] == pytest.approx(8.125, abs=0.03)  # + the bf16 GDN a/b
    assert rep["bits_per_weight"]["embed"] == pytest.approx(8.125)
    assert rep["eval"]["compute_dtype"] == "float32" and rep["eval"]["device"] == "cpu"
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["group_size"] == 128
    sd = load_file(str(dst / "model.safetensors"))
    n, k = sd["model.layers.0.mlp.down_proj.qweight"].shape
    assert sd["model.layers.0.mlp.down_proj.scales"].shape == (n, k // 128)
    # the same model as dense fp32 weights (the dequantized q8 values) in a plain checkpoint
    dense = {}
    for name, t in sd.items():
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            dense[p + ".weight"] = dequantize_q8(t, sd[p + ".scales"])
        elif not name.endswith(".scales"):
            dense[name] = t
    dd = tmp_path / "dense"
    dd.mkdir()
    save_file(dense, str(dd / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config")
    (dd / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        yq = load_model(dst, "cpu", torch.float32)(ids)
        yd = load_model(dd, "cpu", torch.float32)(ids)
    assert yq.dtype == torch.float32
    torch.testing.assert_close(yq, yd, rtol=1e-5, atol=1e-5)


def test_q8_per_row_option(src, tmp_path):
    """--group-size 0: one fp16 scale per output row (the layout of earlier olmo-local q8 checkpoints)."""
    out = tmp_path / "q8row"
    out.mkdir()
    tally, _ = write_quantized(src, out, QuantOptions("q8", group_size=0))
    assert set(tally.formats) == {"q8 per-row"}
    sd = load_file(str(out / "model.safetensors"))
    n, k = sd["model.layers.0.mlp.down_proj.qweight"].shape
    assert sd["model.layers.0.mlp.down_proj.scales"].shape == (n,)
    assert sd["model.embed_tokens.scales"].dim() == 1
    m = load_model(out, "cpu", torch.float32)
    assert m.layers[0].mlp.down.group_size == 0
    with torch.no_grad():
        assert torch.isfinite(m(torch.arange(20)[None])).all()
    with pytest.raises(OlmoError, match="group-size"):
        QuantOptions("q4", group_size=0)


def test_q8_parts_of_a_q4_model_use_groups_of_128(src, tmp_path):
    """--group-size sets q4's groups; the q8 embedding and lm_head of a q4 g32 model stay at g128."""
    out = tmp_path / "q4g32"
    out.mkdir()
    tally, _ = write_quantized(src, out, QuantOptions("q4", group_size=32, lm_head="q8"))
    assert set(tally.formats) == {"q4 g32", "q8 g128"}  # the decoder linears and the lm_head
    r = TensorReader(out)
    v, d = r.shape("model.embed_tokens.qweight")
    assert r.shape("model.embed_tokens.scales") == (v, d // 128)
    assert r.shape("lm_head.scales") == (v, d // 128)


def test_refuses_to_overwrite_and_force_replaces(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    rc, out, err = cli(capsys, "quantize", src, dst, "--format", "q8", "--no-report")
    assert rc == 1 and err.startswith("error: ") and "already exists" in err and "--force" in err
    assert err.count("\n") == 1 and (dst / "keep.txt").read_text() == "precious"
    rc, out, err = cli(capsys, "quantize", src, dst, "--format", "q8", "--no-report", "--force")
    assert rc == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    rep = json.loads((dst / "quant_report.json").read_text())
    assert rep["eval"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("args,msg", [
    (("--format", "q3"), "unknown --format"),
    (("--format", "q4", "--group-size", "96"), "--group-size"),
    (("--format", "q8", "--group-size", "96"), "--group-size"),
    (("--format", "q8", "--lm-head", "q2"), "--lm-head"),
    (("--format", "q8", "--double-quant"), "nf4 only"),
    (("--format", "q8", "--baseline", "gptq"), "--baseline"),
    (("--format", "q8", "--text", "/nonexistent.txt"), "no such text file"),
])
def test_bad_options_are_one_line_errors(args, msg, src, tmp_path, capsys):
    rc, out, err = cli(capsys, "quantize", src, tmp_path / "x", *args)
    assert rc == 1 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_quantizing_a_quantized_checkpoint_is_refused(src, tmp_path, capsys):
    q = tmp_path / "q"
    assert cli(capsys, "quantize", src, q, "--format", "q8", "--no-report")[0] == 0
    rc, out, err = cli(capsys, "quantize", q, tmp_path / "qq", "--format", "q4", "--no-report")
    assert rc == 1 and "already quantized" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_destination(sig, tmp_path_factory, tmp_path):
    # a source big enough that the run is still streaming tensors when the signal arrives
    src = tmp_path_factory.getbasetemp() / "big-src"
    if not src.exists():
        from olmo_local.config import OlmoHybridConfig
        from olmo_local.random_init import write_random_checkpoint

        cfg = OlmoHybridConfig(**{**SHAPE, "hidden_size": 256, "intermediate_size": 1024,
                                  "num_hidden_layers": 8})
        write_random_checkpoint(src, cfg)
        write_byte_tokenizer(src)
    dst = tmp_path / "out" / "model"
    p = subprocess_cli("quantize", src, dst, "--format", "q4", "--baseline", "nf4")
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "[2/" not in line:  # plain progress lines: kill after the 2nd tensor
        line = p.stderr.readline()
        assert line or p.poll() is None, "quantize ended before it could be interrupted"
    assert p.poll() is None, "quantize finished before the signal"
    assert list((tmp_path / "out").glob(".model.tmp-*")), "the temporary directory should exist mid-run"
    p.send_signal(sig)
    rc = p.wait(60)
    rest = p.stderr.read()
    assert not dst.exists()
    left = list((tmp_path / "out").iterdir())
    if sig == signal.SIGKILL:  # nothing can clean up: at most the hidden temp dir, never DST
        assert rc == -signal.SIGKILL and all(x.name.startswith(".model.tmp-") for x in left)
    else:
        assert rc == 130 and "interrupted" in rest and left == [], (rc, rest, left)


def test_sharded_output_and_tied_q8_head(src_tied, tmp_path, capsys):
    dst = tmp_path / "sharded"
    rc, out, err = cli(capsys, "quantize", src_tied, dst, "--format", "q4", "--group-size", "64",
                       "--max-shard-size", "100KB", "--no-report")
    assert rc == 0, err
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2 and all((dst / s).is_file() for s in shards)
    for s in shards:  # plain safetensors files, every tensor aligned to its element size
        with safe_open(str(dst / s), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        raw = (dst / s).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        hdr = json.loads(raw[8:8 + n])
        for k, v in hdr.items():
            if k != "__metadata__":
                es = torch.tensor([], dtype=_ST[v["dtype"]]).element_size()
                assert (8 + n + v["data_offsets"][0]) % es == 0, k
    r = TensorReader(dst)
    assert "lm_head.weight" not in r.names() and r.dtype("model.embed_tokens.qweight") == torch.int8
    one = tmp_path / "single"
    one.mkdir()
    write_quantized(src_tied, one, QuantOptions("q4", group_size=64))
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    single = load_file(str(one / "model.safetensors"))
    assert set(single) == set(idx["weight_map"])
    for k, v in single.items():  # sharding changes nothing but the files
        with safe_open(str(dst / idx["weight_map"][k]), "pt") as f:
            assert torch.equal(f.get_tensor(k), v), k
    q = load_model(dst, "cpu", torch.float32)
    assert q.lm_head.qweight.data_ptr() == q.embed.qweight.data_ptr()  # tied head reads the same int8 rows
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = q.embed(ids)
        want = emb @ q.embed.dequantize().T  # the head of a tied model is the (dequantized) table
        assert torch.allclose(q.lm_head(emb), want, atol=1e-5)


_ST = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
       "U8": torch.uint8}


# ------------------------------------------------------------------------------------------ closeness


def test_q8_logits_close_to_bf16(src, tmp_path):
    """q8 (lm_head q8, embedding q8) vs the bf16 source, both computed in fp32: prefill + 48 teacher-forced
    decode steps. Bound: max |Δlogit| <= 2% of the logits' range, mean KLD <= 1e-3, argmax agreement
    >= 95%."""
    out = tmp_path / "q8"
    out.mkdir()
    write_quantized(src, out, QuantOptions("q8"))
    ref = load_model(src, "cpu", torch.float32)
    q = load_model(out, "cpu", torch.float32)
    cfg = ref.config
    ids = torch.randint(0, 256, (1, 64 + 48), generator=torch.Generator().manual_seed(3))
    sr, sq = DecodeState(cfg, 256), DecodeState(cfg, 256)
    la, lb = [], []
    with torch.no_grad():
        la.append(ref(ids[:, :64], sr)[0])
        lb.append(q(ids[:, :64], sq)[0])
        for t in range(64, ids.shape[1]):
            la.append(ref(ids[:, t:t + 1], sr)[0])
            lb.append(q(ids[:, t:t + 1], sq)[0])
    a, b = torch.cat(la)[:, :260], torch.cat(lb)[:, :260]
    rng = (a.max() - a.min()).item()
    worst = (a - b).abs().max().item()
    lpa, lpb = a.log_softmax(-1), b.log_softmax(-1)
    kld = (lpa.exp() * (lpa - lpb)).sum(-1)
    same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"q8 vs bf16: max |dlogit| {worst:.4f} (range {rng:.2f}), KLD {kld.mean().item():.5f}, "
          f"same {same:.4f}")
    assert worst <= 0.03 * rng, (worst, rng)
    assert kld.mean().item() <= 5e-3, kld.mean().item()
    assert same >= 0.9, same


# --------------------------------------------------------------------------------- corrupt quantized files


@pytest.fixture
def q4dir(src, tmp_path):
    out = tmp_path / "q4"
    out.mkdir()
    write_quantized(src, out, QuantOptions("q4"))
    return out


def _edit(path: Path, fn) -> None:
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"))


def _one_line_error(capsys, path: Path, *needles: str) -> None:
    for cmd in (("generate", path, "hi", "-n", "2", "--device", "cpu"),
                ("eval", path, *EVAL_ARGS, "--device", "cpu")):
        rc, out, err = cli(capsys, *cmd)
        assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err and all(n in err for n in needles), err


def test_truncated_quantized_file(q4dir, capsys):
    f = q4dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _one_line_error(capsys, q4dir, "corrupt or truncated")


def test_qweight_of_wrong_shape(q4dir, capsys):
    p = "model.layers.0.mlp.up_proj"
    _edit(q4dir, lambda t: t.__setitem__(p + ".qweight", t[p + ".qweight"][:, :-8].contiguous()))
    _one_line_error(capsys, q4dir, p, "qweight")


def test_consistently_misshaped_linear(q4dir, capsys):
    p = "model.layers.1.linear_attn.o_proj"

    def edit(t):
        for k in ("qweight", "scales", "mins"):
            t[f"{p}.{k}"] = t[f"{p}.{k}"][:-4].contiguous()
    _edit(q4dir, edit)
    _one_line_error(capsys, q4dir, p, "config.json")


def test_missing_scales(q4dir, capsys):
    p = "model.layers.3.self_attn.q_proj"
    _edit(q4dir, lambda t: t.pop(p + ".scales"))
    _one_line_error(capsys, q4dir, p + ".scales", "missing")


def test_q8_scales_wrong_length(src, tmp_path, capsys):
    out = tmp_path / "q8"
    out.mkdir()
    write_quantized(src, out, QuantOptions("q8"), copy_files=True)
    p = "model.layers.2.mlp.down_proj"
    _edit(out, lambda t: t.__setitem__(p + ".scales", t[p + ".scales"][:-1].contiguous()))
    _one_line_error(capsys, out, p, "scales")


# ------------------------------------------------------------------- bitsandbytes checkpoints (transformers)


def _bnb_checkpoint(src: Path, dst: Path, bits: int) -> tuple[Path, Path]:
    """Write ``src`` the way transformers + bitsandbytes save a load_in_{4,8}bit model: every decoder
    nn.Linear (a/b projections included) replaced by Linear4bit / Linear8bitLt and its state_dict
    written as is; embedding, norms, conv, A_log/dt_bias and lm_head (skipped module) unchanged.
    Also writes the dense checkpoint of the dequantized weights (what the bnb model computes)."""
    from transformers import BitsAndBytesConfig

    from olmo_local.checkpoint import linear_shapes, read_config

    cfg = read_config(src)
    sd = load_file(str(src / "model.safetensors"))
    qsd, dense = {}, {}
    lin = set(linear_shapes(cfg)) - {"lm_head"}
    for name, w in sd.items():
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and prefix in lin:
            n, k = w.shape
            if bits == 4:
                # BitsAndBytesConfig's defaults: nf4 as asked, bnb_4bit_use_double_quant=False
                m = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                      compress_statistics=False)
                m.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=False)
                m = m.to("cpu")
                deq = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            else:
                m = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
                m.weight = bnb.nn.Int8Params(w.clone().half(), requires_grad=False, has_fp16_weights=False)
                m = m.to("cpu")
                deq = m.weight.data.float() * m.weight.SCB.float()[:, None] / 127
            for k2, v in m.state_dict().items():
                qsd[f"{prefix}.{k2}"] = v.clone()
            dense[name] = deq.float()
        else:
            qsd[name] = w
            dense[name] = w
    raw = json.loads((src / "config.json").read_text())
    bc = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                            bnb_4bit_compute_dtype=torch.bfloat16)
    out_q, out_d = dst / f"bnb{bits}", dst / f"bnb{bits}-dequantized"
    for out, tensors, qc in ((out_q, qsd, bc.to_dict()), (out_d, dense, None)):
        out.mkdir()
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps({**raw, **({"quantization_config": qc} if qc else {})}))
        for f in ("tokenizer.json", "generation_config.json"):
            (out / f).write_bytes((src / f).read_bytes())
    return out_q, out_d


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_checkpoint_loads_and_matches(bits, src, tmp_path, capsys):
    qdir, ddir = _bnb_checkpoint(src, tmp_path, bits)
    names = TensorReader(qdir).names()
    marker = "weight.quant_state.bitsandbytes__nf4" if bits == 4 else "SCB"
    assert f"model.layers.0.linear_attn.a_proj.{marker}" in names
    q = load_model(qdir, "cpu", torch.float32)
    d = load_model(ddir, "cpu", torch.float32)
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (q(ids) - d(ids)).abs().max().item()
    assert diff < 1e-4, diff
    rc, out, err = cli(capsys, "info", qdir)
    assert rc == 0 and "bitsandbytes" in out
    rc, out, err = cli(capsys, "generate", qdir, "Hi", "-n", "4", "--temperature", "0", "--device", "cpu")
    assert rc == 0, err


def test_nf4_output_equals_transformers_layout(src, tmp_path):
    """Our nf4 checkpoint holds, per decoder linear, exactly the tensors a Linear4bit state_dict has."""
    out = tmp_path / "nf4"
    out.mkdir()
    write_quantized(src, out, QuantOptions("nf4"))
    qdir, _ = _bnb_checkpoint(src, tmp_path, 4)
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(qdir / "model.safetensors"))

    def not_ab(keys):
        return {k for k in keys if ".a_proj." not in k and ".b_proj." not in k}

    assert not_ab(ours) == not_ab(theirs)
    for k in not_ab(ours):
        if k.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(ours[k].tolist())) == json.loads(bytes(theirs[k].tolist())), k
        else:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert ours["model.layers.0.linear_attn.a_proj.weight"].dtype == torch.bfloat16  # kept high precision


def test_quantize_rejects_source_problems(src, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    t = load_file(str(src / "model.safetensors"))
    del t["model.layers.0.mlp.up_proj.weight"]
    save_file(t, str(bad / "model.safetensors"))
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(OlmoError, match="missing 1 tensor"):
        write_quantized(bad, out, QuantOptions("q4"))


@pytest.mark.parametrize("opts,names", [
    (QuantOptions("q4", lm_head="q4"), {"lm_head.mins": torch.float16, "model.embed_tokens.qweight": torch.int8}),
    (QuantOptions("q8", lm_head="bf16", embed="bf16"),
     {"lm_head.weight": torch.bfloat16, "model.embed_tokens.weight": torch.bfloat16}),
    (QuantOptions("nf4", double_quant=True),
     {"model.layers.0.mlp.up_proj.weight.nested_absmax": torch.float32, "lm_head.weight": torch.bfloat16}),
    (QuantOptions("nf4", lm_head="q8", embed="q8"), {"lm_head.qweight": torch.int8}),
])
def test_option_combinations_write_and_load(opts, names, src, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    write_quantized(src, out, opts)
    r = TensorReader(out)
    for n, dt in names.items():
        assert r.dtype(n) == dt, n
    assert r.dtype("model.layers.0.linear_attn.A_log") == torch.float32
    assert r.dtype("model.layers.0.linear_attn.a_proj.weight") == torch.bfloat16
    assert r.dtype("model.layers.3.self_attn.q_norm.weight") == torch.bfloat16
    m = load_model(out, "cpu", torch.float32)
    with torch.no_grad():
        y = m(torch.arange(20)[None])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_blocks_straddling_rows(dq, monkeypatch):
    """in_features not a multiple of 64 (the demo's GDN o_proj has 288): bitsandbytes' blocks run across
    rows. bitsandbytes 0.50's CPU dequantize_4bit gets these wrong; ours follows the format's definition
    (element j = code[q_j] * absmax[j // 64])."""
    from olmo_local.quant import checkpoint as ck
    from olmo_local.quant import linear as L

    w = (torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    sd = ck.quantize_linear_tensors("p", w, "nf4", double_quant=dq)
    m = ck.load_linear(sd.__getitem__, sd.__contains__, "p", "cpu", torch.float32)
    packed = sd["p.weight"].reshape(-1)
    q = torch.stack((packed >> 4, packed & 15), 1).reshape(-1).long()
    ref = (m.quant_map[q] * m.absmax_fp32().repeat_interleave(64)).reshape(48, 96).bfloat16().float()
    assert torch.equal(m.dequantize(), ref)
    assert ((ref - w.float()).norm() / w.float().norm()).item() < 0.12
    x = torch.randn(3, 96)
    monkeypatch.setattr(L, "_FWD_CHUNK_ELEMS_DECODE", 96 * 5)  # row chunks that start mid-block
    torch.testing.assert_close(m(x), x @ ref.T, rtol=1e-5, atol=1e-5)
