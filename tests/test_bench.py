"""olmo-local bench: every field in every output format (md, json, csv) on a synthetic tiny model, the
bytes-per-token arithmetic against a hand count for the 7B (spec §3 and §6), synthetic models holding
exactly the bytes their format says, decode timed through Generator.step, and --compare hf (ratio, and
one clear line when transformers / bitsandbytes are missing)."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch

from olmo_local import bench_roofline as roof
from olmo_local.bench import parse_depths, run_bench
from olmo_local.bench_report import ROW_FIELDS, csv_columns, render_csv, render_json, render_markdown
from olmo_local.config import preset
from olmo_local.errors import OlmoError

SMALL = dict(synthetic="tiny", device="cpu", reps=2, n_prompt=24, n_gen=6, bw_bytes=8 * 2**20)
TESTS = ["pp24", "tg6", "tg6@d40", "ttft"]
MD_COLUMNS = ["model", "size", "params", "format", "device", "test", "t/s", "roofline t/s", "% roofline"]


@pytest.fixture(scope="module")
def result():
    return run_bench(depth="40", **SMALL)


def _md_table(text: str) -> tuple[list[str], list[list[str]]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return rows[0], rows[2:]


# ---- output formats ----------------------------------------------------------------------------
def test_json_has_every_field(result):
    d = json.loads(render_json(result))
    assert set(d) == {"env", "model", "memory", "roofline", "rows"}
    assert [r["test"] for r in d["rows"]] == TESTS
    for r in d["rows"]:
        assert set(ROW_FIELDS) <= set(r)
        assert len(r["samples"]) == 2 and r["mean"] > 0 and r["stddev"] >= 0
        assert r["unit"] == ("ms" if r["test"] == "ttft" else "t/s")
        if r["kind"] == "tg":  # roofline on every tg row
            assert r["bytes_per_token"] > 0 and r["roofline_tps"] > 0 and 0 < r["roofline_pct"]
        else:
            assert r["roofline_tps"] is None
    m = d["model"]
    assert m["format"] == "bf16" and m["device"] == "cpu" and m["params"] == preset("tiny").num_params()
    assert m["size_bytes"] == sum(roof.format_weight_bytes(preset("tiny"), "bf16").values())
    assert m["load_s"] > 0
    assert d["memory"]["peak_rss_bytes"] > 0 and d["memory"]["peak_device_bytes"] is None
    assert d["roofline"]["bandwidth_bytes_per_s"] > 1e8
    assert d["env"]["torch"] == torch.__version__ and d["env"]["device_name"] and d["env"]["date"]
    deep = d["rows"][2]
    assert deep["depth"] == 40 and deep["bytes_per_token"] > d["rows"][1]["bytes_per_token"]


def test_csv_has_every_field(result):
    rows = list(csv.DictReader(io.StringIO(render_csv(result))))
    assert [r["test"] for r in rows] == TESTS
    assert list(rows[0]) == csv_columns()
    for r in rows:
        assert float(r["mean"]) > 0 and len(r["samples"].split(";")) == 2
        assert r["model_format"] == "bf16" and int(r["peak_rss_bytes"]) > 0
        assert float(r["bandwidth_bytes_per_s"]) > 0 and r["env_torch"] == torch.__version__
    assert float(rows[1]["roofline_pct"]) > 0 and rows[0]["roofline_pct"] == ""


def test_markdown_table(result):
    text = render_markdown(result)
    lines = text.splitlines()
    assert lines[0].startswith("olmo-local ") and "torch " in lines[0]  # the environment line
    head, body = _md_table(text)
    assert head == MD_COLUMNS
    assert [r[5] for r in body] == TESTS
    for r in body:
        assert len(r) == len(MD_COLUMNS) and r[3] == "bf16" and r[4] == "cpu" and "±" in r[6]
    assert body[-1][6].endswith(" ms") and float(body[1][8]) > 0
    assert "peak host RSS" in text and "copy bandwidth" in text


def test_cli_json_and_md(tmp_path):
    from typer.testing import CliRunner

    from olmo_local.cli import app

    args = ["bench", "--synthetic", "tiny", "-p", "16", "-n", "4", "-r", "1", "--device", "cpu", "--bw-mib", "8"]
    r = CliRunner().invoke(app, args + ["-o", "json", "-q"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [x["test"] for x in d["rows"]] == ["pp16", "tg4", "ttft"]  # CPU: no depth rows by default
    r = CliRunner().invoke(app, args + ["--format", "q8"])
    assert r.exit_code == 0, r.output
    head, body = _md_table(r.stdout)
    assert head == MD_COLUMNS and body[0][3] == "q8"
    assert "bench: " in r.stderr and "bench: " not in r.stdout  # progress on stderr, table on stdout


def test_parse_depths():
    assert parse_depths(None, "cuda") == [4096, 32768] and parse_depths(None, "cpu") == []
    assert parse_depths("4096,32k", "cpu") == [4096, 32768] and parse_depths("none", "cuda") == []
    with pytest.raises(OlmoError):
        parse_depths("lots", "cpu")


def test_decode_is_timed_through_generator_step(monkeypatch):
    """What bench times per token is Generator.step of the runtime's Generator, so a step_fn plugged in
    runtime.make_generator (a CUDA graph) is what it measures."""
    from olmo_local import runtime

    calls = []
    real = runtime.make_generator

    def counting(model, state, *args, **kwargs):
        gen = real(model, state, *args, **kwargs)
        eager = gen.step

        def step_fn(tok):
            calls.append(tok)
            gen.step_fn = None
            try:
                return eager(tok)
            finally:
                gen.step_fn = step_fn
        gen.step_fn = step_fn
        return gen

    monkeypatch.setattr(runtime, "make_generator", counting)
    run_bench(synthetic="tiny", device="cpu", reps=2, n_prompt=0, n_gen=5, depth="none", bw_bytes=2**20)
    assert len(calls) == (2 + 1) * 5  # warm-up + 2 runs, 5 tokens each


# ---- bytes per token: hand count for the 7B ------------------------------------------------------
TOTAL_7B, EMB_7B = 7_430_870_688, 385_351_680  # spec §3
A_LOG_DT_BIAS = 24 * (30 + 30)  # fp32 in memory
KV_TOK = 122_880  # spec §6: 8 layers · K,V · 30 heads · 128 · 2 B
STATE = 53_084_160 + 1_658_880  # spec §6: recurrent (fp32) + conv (bf16)


def _by_kind_bf16(cfg):
    return roof.format_weight_bytes(cfg, "bf16")


def test_decode_bytes_7b_bf16_hand_count():
    cfg = preset("7b")
    assert cfg.num_params() == TOTAL_7B
    non_emb = TOTAL_7B - EMB_7B  # 7,045,519,008 (lm_head untied, counted)
    weights = 2 * (non_emb - A_LOG_DT_BIAS) + 4 * A_LOG_DT_BIAS + 3840 * 2  # + one embedding row
    assert weights == 14_091_048_576
    wb = _by_kind_bf16(cfg)
    assert wb["embedding"] == 2 * EMB_7B
    assert roof.state_bytes(cfg) == STATE and roof.kv_bytes_per_token(cfg) == KV_TOK
    assert roof.decode_bytes_per_token(cfg, wb, 0) == weights + 2 * STATE == 14_200_534_656
    assert roof.decode_bytes_per_token(cfg, wb, 4096) == weights + 2 * STATE + 4096 * KV_TOK == 14_703_851_136


def test_decode_bytes_7b_q4_hand_count():
    cfg = preset("7b")
    # quantized linears (q4, group 128 = 4.25 bits: 17/32 byte per weight)
    attn = 8 * 4 * 3840 * 3840                                        # q, k, v, o
    mlp = 32 * 3 * 3840 * 11008                                       # gate, up, down
    gdn = 24 * (2 * 2880 * 3840 + 3 * 5760 * 3840)                    # q, k and v, g, o
    n_q4 = attn + mlp + gdn
    assert n_q4 == 6_653_214_720
    q4 = n_q4 * 17 // 32
    head = 100352 * 3840 + 2 * 100352 * 30                            # q8 lm_head: int8 + fp16 scale per 128
    ab = 24 * 2 * 30 * 3840 * 2                                       # a|b stay bf16
    other = TOTAL_7B - EMB_7B - n_q4 - EMB_7B - ab // 2               # norms, convs, A_log, dt_bias, o_norm
    assert other == 1_423_008
    other_bytes = 2 * (other - A_LOG_DT_BIAS) + 4 * A_LOG_DT_BIAS
    emb_row = 3840 + 2 * 30                                           # one q8 embedding row (int8 + 30 scales)
    weights = q4 + head + ab + other_bytes + emb_row
    wb = roof.format_weight_bytes(cfg, "q4", group_size=128, head_fmt="q8")
    assert (wb["linear"], wb["lm_head"], wb["ab"], wb["other"]) == (q4, head, ab, other_bytes)
    assert wb["embedding"] == 100352 * emb_row                        # q8 table, as quantize writes it
    assert roof.decode_bytes_per_token(cfg, wb, 0) == weights + 2 * STATE == 4_049_291_196
    assert roof.decode_bytes_per_token(cfg, wb, 4096) == weights + 2 * STATE + 4096 * KV_TOK
    # bits per weight of the quantized linears agree with quant/
    from olmo_local.quant.formats import bits_per_weight
    assert q4 * 8 / n_q4 == bits_per_weight("q4", 128) == 4.25


def test_kv_int8_and_tied_head():
    cfg = preset("7b")
    assert roof.kv_bytes_per_token(cfg, torch.int8) == 2 * 8 * 30 * (128 + 4)
    tied = preset("tiny", tie_word_embeddings=True)
    wb = roof.format_weight_bytes(tied, "bf16")
    assert wb["lm_head"] == 0  # the tied head reads the whole embedding table
    assert roof.decode_bytes_per_token(tied, wb, 0) == sum(wb.values()) + 2 * roof.state_bytes(tied)


@pytest.mark.parametrize("fmt", ["bf16", "q8", "q4", "nf4"])
def test_synthetic_model_holds_the_format_bytes(fmt):
    if fmt == "nf4":
        pytest.importorskip("bitsandbytes")
    from olmo_local.bench_synth import build_synthetic

    cfg = preset("tiny")
    model = build_synthetic(cfg, "cpu", fmt)
    assert roof.model_weight_bytes(model) == roof.format_weight_bytes(cfg, fmt)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


# ---- --compare hf --------------------------------------------------------------------------------
def test_compare_hf_reports_a_ratio():
    pytest.importorskip("transformers")
    res = run_bench(depth="none", compare="hf", **SMALL)
    for r in res["rows"]:
        assert r["hf_mean"] > 0 and len(r["hf_samples"]) == 2 and r["speed_ratio"] > 0
        want = r["hf_mean"] / r["mean"] if r["unit"] == "ms" else r["mean"] / r["hf_mean"]
        assert r["speed_ratio"] == pytest.approx(want)
    assert res["rows"][1]["hf_roofline_pct"] > 0 and res["memory"]["hf_load_s"] > 0
    head, body = _md_table(render_markdown(res))
    assert head == MD_COLUMNS + ["hf t/s", "ours/hf"]
    assert all(row[-1].endswith("x") for row in body)
    assert json.loads(render_json(res))["env"]["transformers"]
    assert next(iter(csv.DictReader(io.StringIO(render_csv(res)))))["speed_ratio"]


def test_compare_hf_same_weights():
    """transformers' model built by --compare holds our weights: same logits (bf16 tolerance)."""
    pytest.importorskip("transformers")
    from olmo_local.bench_hf import HFEngine, build_hf
    from olmo_local.bench_synth import build_synthetic
    from olmo_local.state import DecodeState

    cfg = preset("tiny")
    ours = build_synthetic(cfg, "cpu", "q8")  # quantized: transformers gets the dequantized weights
    hf = HFEngine(build_hf(ours, "hf", torch.device("cpu")), "hf", torch.device("cpu"))
    ids = list(range(500, 540))
    with torch.no_grad():
        st = DecodeState(cfg, 64, "cpu", ours.dtype)
        a = ours(torch.tensor([ids]), st)[0, -1].float()
        b = hf.prefill(ids).float()
        assert (a - b).abs().max() <= 0.05 * a.abs().max()
        a = ours(torch.tensor([[7]]), st)[0, -1].float()
        b = hf.step(7).float()
        assert (a - b).abs().max() <= 0.05 * a.abs().max()


def test_compare_without_transformers_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(OlmoError, match=r"needs transformers: pip install 'olmo-local\[hf\]'"):
        run_bench(compare="hf", **SMALL)
    from olmo_local import cli

    monkeypatch.setattr(sys, "argv", ["olmo-local", "bench", "--synthetic", "tiny", "--device", "cpu",
                                      "--compare", "hf"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --compare hf needs transformers: pip install 'olmo-local[hf]'"]


def test_compare_hf_nf4_runs_on_cpu():
    """issue #3's command on CPU with the tiny synthetic model: transformers + bitsandbytes NF4 (its CPU
    kernel) runs beside ours and every row gets a ratio; the linears are bitsandbytes 4-bit except the
    lm_head and the GDN a/b projections, which stay bf16 as in olmo-local's formats."""
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from olmo_local.bench_hf import NF4_SKIP, build_hf
    from olmo_local.bench_synth import build_synthetic

    hf = build_hf(build_synthetic(preset("tiny"), "cpu", "q4"), "hf-nf4", torch.device("cpu"))
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in hf.named_modules() if "Linear" in type(m).__name__}
    assert kinds["gate_proj"] == kinds["q_proj"] == "Linear4bit"
    assert all(kinds[k] == "Linear" for k in NF4_SKIP)
    res = run_bench(depth="none", compare="hf-nf4", **SMALL)
    assert [r["test"] for r in res["rows"]] == ["pp24", "tg6", "ttft"]
    for r in res["rows"]:
        assert r["hf_mean"] > 0 and r["speed_ratio"] > 0


def test_compare_nf4_without_bitsandbytes(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(OlmoError, match="--compare hf-nf4 needs bitsandbytes"):
        run_bench(compare="hf-nf4", **SMALL)
    with pytest.raises(OlmoError, match="unknown --compare"):
        run_bench(compare="vllm", **SMALL)


def test_bench_a_checkpoint_directory(tmp_path):
    from olmo_local.random_init import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "tiny", preset("tiny"), seed=1)
    res = run_bench(model=str(path), **{**SMALL, "synthetic": None, "fmt": "bf16"})
    assert res["model"]["name"] == "tiny" and res["model"]["format"] == "bf16"
    assert res["model"]["size_bytes"] == sum(roof.format_weight_bytes(preset("tiny"), "bf16").values())
    assert [r["test"] for r in res["rows"]] == ["pp24", "tg6", "ttft"]
    with pytest.raises(OlmoError, match="runs as fp32"):
        run_bench(model=str(path), **{**SMALL, "synthetic": None, "fmt": "q4"})
