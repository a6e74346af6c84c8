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
