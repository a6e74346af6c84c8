import pytest
import torch

from olmo_local.config import preset
from olmo_local.errors import OlmoError
from olmo_local.planner import GIB, kv_bytes_per_token, plan, state_bytes


def test_kv_and_state_arithmetic_7b():
    cfg = preset("7b")
    assert kv_bytes_per_token(cfg, "bf16") == 8 * 2 * 30 * 128 * 2 == 122_880
    assert kv_bytes_per_token(cfg, "int8") == 8 * 2 * 30 * (128 + 4)
    assert state_bytes(cfg) == 53_084_160 + 1_658_880


def test_plan_picks_largest_context_and_refuses_what_does_not_fit():
    cfg = preset("7b")
    weights = int(3.9 * GIB)
    p = plan(cfg, weights, free_bytes=8 * GIB)
    assert p.ctx % 256 == 0 and 256 <= p.ctx <= cfg.max_position_embeddings
    assert p.total <= 8 * GIB
    # one more 256-token block would not fit in the usable memory
    bigger = p.total + 256 * p.kv_per_token
    assert bigger > 8 * GIB * 0.95 - 256 * 2**20 or p.ctx == cfg.max_position_embeddings
    # int8 KV gives a longer context in the same memory
    assert plan(cfg, weights, 6 * GIB, kv_cache="int8").ctx > plan(cfg, weights, 6 * GIB).ctx
    with pytest.raises(OlmoError, match="does not fit"):
        plan(cfg, weights, 6 * GIB, ctx=65536)
    with pytest.raises(OlmoError, match="needs about"):
        plan(cfg, int(14.9 * GIB), 8 * GIB)
    assert plan(cfg, weights, 80 * GIB, ctx=4096).ctx == 4096


def test_kv_cache_auto_resolves_per_device():
    from olmo_local.errors import OlmoError
    from olmo_local.runtime import resolve_kv_cache

    assert resolve_kv_cache("auto", torch.device("cuda")) == "int8"
    assert resolve_kv_cache("auto", torch.device("cpu")) == "bf16"
    assert resolve_kv_cache("bf16", torch.device("cuda")) == "bf16"
    assert resolve_kv_cache("int8", torch.device("cpu")) == "int8"
    with pytest.raises(OlmoError, match="auto, bf16 or int8"):
        resolve_kv_cache("fp8", torch.device("cpu"))


def test_prefill_pass_shrinks_with_the_context():
    """Long contexts get shorter prefill passes (their temporaries count at the peak), on CUDA 2048 /
    1024 / 512 tokens up to 8K / 16K / beyond; the plan counts the workspace of the pass it picks and
    make_generator uses the same policy."""
    from olmo_local.planner import prefill_chunk_for, workspace_bytes

    assert [prefill_chunk_for(c) for c in (4096, 8192, 8193, 16384, 32768)] == [2048, 2048, 1024, 1024, 512]
    assert prefill_chunk_for(4096, "cpu") == 512
    cfg = preset("7b")
    weights = int(4.03 * GIB)
    p4 = plan(cfg, weights, 80 * GIB, ctx=4096, kv_cache="int8")
    p32 = plan(cfg, weights, 80 * GIB, ctx=32768, kv_cache="int8")
    assert (p4.prefill_chunk, p32.prefill_chunk) == (2048, 512)
    assert p32.workspace == workspace_bytes(cfg, 512, 0) < p4.workspace
    assert ("prefill pass", "512 tokens") in p32.lines()
    auto = plan(cfg, weights, 80 * GIB)  # the largest context that fits: long, so short passes
    assert auto.ctx == cfg.max_position_embeddings and auto.prefill_chunk == 512
    # a model whose context is short anyway gets long passes
    short = plan(preset("7b", max_position_embeddings=4096), weights, 80 * GIB)
    assert (short.ctx, short.prefill_chunk) == (4096, 2048)
    # little memory: the largest context is chosen with short passes; long ones would not leave room
    small = plan(cfg, weights, int(5.2 * GIB), kv_cache="int8")
    assert small.ctx <= 8192 and small.prefill_chunk == 512
    with pytest.raises(OlmoError):
        plan(cfg, weights, int(5.2 * GIB), ctx=small.ctx, kv_cache="int8", prefill_chunk=2048)
    assert plan(cfg, weights, 80 * GIB, ctx=4096, prefill_chunk=256).prefill_chunk == 256


def test_plan_counts_the_prefill_graphs_on_cuda():
    """On CUDA the prefill graphs' pool (one pass of the largest bucket) is reserved for the session: it is in
    the total and the plan's lines, and leaves a shorter context than on CPU in the same memory."""
    from olmo_local.planner import prefill_graph_bytes, workspace_bytes
    from olmo_local.prefill_graph import BUCKETS

    cfg = preset("7b")
    weights = int(4.03 * GIB)
    gpu = plan(cfg, weights, 6 * GIB, kv_cache="int8", device_type="cuda", prefill_chunk=512)
    cpu = plan(cfg, weights, 6 * GIB, kv_cache="int8", device_type="cpu", prefill_chunk=512)
    assert gpu.graphs == prefill_graph_bytes(cfg) == workspace_bytes(cfg, max(BUCKETS), 0) > 0
    assert cpu.graphs == 0
    assert gpu.ctx < cpu.ctx
    assert gpu.total == cpu.total - (cpu.ctx - gpu.ctx) * cpu.kv_per_token + gpu.graphs
    assert any(k == "prefill graphs" for k, _ in gpu.lines()) and not any(k == "prefill graphs" for k, _ in cpu.lines())
