"""The static-shape decode step (what becomes one CUDA graph on GPU) equals the model's eager path on CPU,
for dense and quantized weights, NoPE and RoPE; the Generator can run on it."""

import pytest
import torch

from hf_ref import hf_model, tiny_config, write_checkpoint
from olmo_local.checkpoint import load_model
from olmo_local.decode import DecodeStep
from olmo_local.generate import Generator, SamplingParams
from olmo_local.quant.linear import Q4Linear, Q8Linear
from olmo_local.state import DecodeState


def _quantize_model(model, fmt):
    from olmo_local.quant.formats import quantize_q4, quantize_q8
    for layer in model.layers:
        for name, mod in list(layer.named_modules()):
            if name.endswith(("qkvz", "qkv", "o", "gate_up", "down")) and hasattr(mod, "weight"):
                w = mod.weight.float()
                q = Q4Linear(**quantize_q4(w, 32)) if fmt == "q4" else Q8Linear(**quantize_q8(w))
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], q)
    return model


@pytest.mark.parametrize("fmt,rope,kv", [("dense", None, "bf16"), ("dense", 10000.0, "bf16"), ("q4", None, "bf16"),
                                         ("q4-tiled", None, "bf16"), ("q8", None, "bf16"),
                                         ("dense", None, "int8"), ("unfused", None, "bf16"),
                                         ("unfused", None, "int8"), ("nomerge", None, "bf16"),
                                         ("q4-nofold", None, "bf16"), ("q4-8layers", None, "bf16"),
                                         ("q4-dkmajor", None, "bf16"), ("q4-abinside", None, "bf16"),
                                         ("q4-convinstep", None, "bf16"), ("q4-noembedfold", None, "bf16"),
                                         ("q4-8layers-nobeside", None, "bf16"), ("q4", None, "int8"),
                                         ("q4-prepsep", None, "bf16"), ("q4-prepsep", None, "int8")])
def test_static_step_equals_eager(tmp_path, fmt, rope, kv, monkeypatch):
    """The static step equals the eager forward token by token; "unfused": NoPE attention through the
    separate norm / cache-write ops instead of attention_prep; "nomerge": an attention layer's last
    post-norm and the next norm as two ops; "q4-nofold": q4 with norm ops instead of folded norms (every
    path must equal the eager forward); "q4-dkmajor": the static state's recurrent state stored dk-major
    (as on CUDA); "q4-abinside": the GDN a|b projection inside the GDN step instead of beside the
    in-projection; "q4-convinstep": the q|k|v conv and the GDN gated norm's rstd inside the GDN step instead of
    the in-projection's conv epilogue and the o projection's head_rstd; "q4-noembedfold": the first layer's
    input norm as its own op instead of folded into the embedding launch; "q4-8layers-nobeside": GDN layers after
    an attention layer with a|b, conv and gated norm inside their GDN step; "q4" attention layers take the q/k
    sums of squares from the qkv projection and the attention op does the rest (attention_decode_prep),
    "q4-prepsep" runs attention_prep between them instead."""
    extra = {}
    if fmt.startswith("q4-8layers"):  # GDN layers after an attention layer too (its post-norm merged with their input norm)
        extra = dict(num_hidden_layers=8, layer_types=["linear_attention"] * 3 + ["full_attention"]
                     + ["linear_attention"] * 3 + ["full_attention"])
    cfg = tiny_config(rope_theta=rope, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                      linear_key_head_dim=16, linear_value_head_dim=32, **extra)
    model = load_model(write_checkpoint(hf_model(cfg, seed=5), cfg, tmp_path / "c"), "cpu", torch.float32)
    if fmt == "unfused":
        monkeypatch.setattr(DecodeStep, "fuse_attention_prep", False)
    elif fmt == "nomerge":  # an attention layer's post-norm and the next norm as two ops
        monkeypatch.setattr(DecodeStep, "merge_post_norms", False)
    elif fmt == "q4-nofold":  # q4 with the norm ops instead of the folded norms
        monkeypatch.setattr(DecodeStep, "fold_norms", False)
        model = _quantize_model(model, "q4")
    elif fmt != "dense":
        model = _quantize_model(model, fmt[:2])
    if fmt == "q4-abinside":
        monkeypatch.setattr(DecodeStep, "ab_in_projection", False)
    if fmt == "q4-convinstep":
        monkeypatch.setattr(DecodeStep, "conv_in_projection", False)
    if fmt == "q4-prepsep":
        monkeypatch.setattr(DecodeStep, "prep_in_attention", False)
    if fmt == "q4-noembedfold":
        monkeypatch.setattr(DecodeStep, "fold_embed_norm", False)
    if fmt == "q4-8layers-nobeside":  # a GDN layer after an attention layer keeps a|b, conv and norm in its step
        monkeypatch.setattr(DecodeStep, "beside_after_norm", False)
    if fmt.startswith("q4") and fmt != "q4-nofold":  # the q8 embedding of quantized checkpoints (q4 layout)
        from olmo_local.quant.linear import QEmbedding

        if model.lm_head is None:  # tied: keep the dense head
            model.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            model.lm_head.weight.data.copy_(model.embed.weight.data)
        model.embed = QEmbedding.from_weight(model.embed.weight.detach(), group_size=32)
    if fmt == "q4-tiled":  # the GPU layout (what load_model does on CUDA), here on the CPU paths
        tiled = [m.tile_() for m in model.modules() if isinstance(m, Q4Linear)]
        assert sum(tiled) >= 4  # at least every gate|up (rows a multiple of 128)
    prompt = torch.randint(0, cfg.vocab_size, (1, 70), generator=torch.Generator().manual_seed(0))
    eager = DecodeState(cfg, 128, kv_cache=kv)
    if fmt == "q4-dkmajor":
        monkeypatch.setattr(DecodeState, "rec_dk_major", True)
    static = DecodeState(cfg, 128, kv_cache=kv)
    assert static.rec_state.stride()[-1] == (1 if fmt != "q4-dkmajor" else cfg.linear_key_head_dim)
    with torch.no_grad():
        model(prompt, eager)
        model(prompt, static)
        step = DecodeStep(model, static, use_graph=False)
        toks = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
        for t in toks:
            want = model(torch.tensor([[t]]), eager)[0, -1]
            got = step(t)
            assert (want - got).abs().max().item() < 2e-4
    assert static.pos == eager.pos == 82 and int(static.pos_t) == 82 and static.tokens == eager.tokens
    assert torch.allclose(static.rec_state, eager.rec_state, atol=1e-5)
    assert torch.allclose(static.conv_state, eager.conv_state, atol=1e-4)
    assert torch.allclose(static.k_cache[:, :, :82], eager.k_cache[:, :, :82], atol=1e-4)


def test_generator_on_static_step_matches_eager(tmp_path):
    cfg = tiny_config()
    model = load_model(write_checkpoint(hf_model(cfg, seed=2), cfg, tmp_path / "c"), "cpu", torch.float32)
    prompt = list(range(5, 40))
    sp = SamplingParams(temperature=0, max_new_tokens=20)
    a = Generator(model, DecodeState(cfg, 128)).generate(prompt, sp)
    st = DecodeState(cfg, 128)
    b = Generator(model, st, step_fn=DecodeStep(model, st, use_graph=False)).generate(prompt, sp)
    assert a == b


def test_int8_kv_cache_stays_close_to_bf16(tmp_path):
    cfg = tiny_config()
    model = load_model(write_checkpoint(hf_model(cfg, seed=4), cfg, tmp_path / "c"), "cpu", torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 90), generator=torch.Generator().manual_seed(3))
    a, b = DecodeState(cfg, 128), DecodeState(cfg, 128, kv_cache="int8")
    with torch.no_grad():
        model(ids[:, :80], a), model(ids[:, :80], b)
        la, lb = model(ids[:, 80:], a), model(ids[:, 80:], b)  # these read the quantized cache
    assert b.k_cache.dtype == torch.int8 and b.nbytes < a.nbytes
    rel = (la - lb).norm() / la.norm()
    assert 0 < rel.item() < 2e-2


def test_first_graph_step_decodes_its_own_token(tmp_path):
    """Capturing the graph runs warm-up steps on token 0 and restores the state; the token of the
    call that triggers the capture must still be the one decoded (a regression: the first step after
    capture decoded token 0, which the GPU state check found). The graph is faked so that this runs
    on CPU: capture = the real warm-up side effects, replay = the static forward."""
    cfg = tiny_config()
    model = load_model(write_checkpoint(hf_model(cfg, seed=3), cfg, tmp_path / "c"), "cpu", torch.float32)

    class Replay:
        def __init__(self, step, buf):
            self.step, self.buf = step, buf

        def replay(self):
            self.buf.copy_(self.step.forward())  # a graph's static logits buffer

    class FakeGraphStep(DecodeStep):
        def capture(self):
            snap = self.state.snapshot()
            self.token.fill_(0)
            for _ in range(2):
                self.forward()
                self.state.pos_t.fill_(snap.pos)
            self.state.restore(snap)
            buf = torch.empty(cfg.vocab_size)
            self.graphs = [(Replay(self, buf), buf)]

    prompt = torch.randint(1, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    eager, static = DecodeState(cfg, 64), DecodeState(cfg, 64)
    toks = [7, 11, 13]
    with torch.no_grad():
        model(prompt, eager)
        model(prompt, static)
        step = FakeGraphStep(model, static, use_graph=True)
        for t in toks:
            want = model(torch.tensor([[t]]), eager)[0, -1]
            got = step(t)
            assert (want - got).abs().max().item() < 2e-4
    assert static.tokens == eager.tokens
    assert torch.allclose(static.rec_state, eager.rec_state, atol=1e-5)


class _PickReplay:
    """A CPU stand-in for a captured greedy / sampling graph: replay = the static forward + _pick_tail
    (copying the id to host slot ``slot``, as the two captured graphs do)."""

    def __init__(self, step, mode, slot):
        self.step, self.mode, self.slot = step, mode, slot

    def replay(self):
        self.step.log.append(("launch", self.slot))
        self.step._forward_pick(self.mode, self.slot)


class _FakePickGraphStep(DecodeStep):
    """DecodeStep whose greedy / sampling "graphs" are _PickReplay (the real capture needs CUDA); ``log``
    records the replays and the host reads of the id slots."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []
        step = self

        class Slot:
            def __init__(self, arr, i):
                self.arr, self.i = arr, i

            def __getitem__(self, k):
                step.log.append(("read", self.i))
                return self.arr[k]

        self._host_nps = [Slot(a, i) for i, a in enumerate(self._host_nps)]

    def capture(self, mode=None):
        assert mode is not None
        self.pick_graphs[mode[0]] = (mode, [[_PickReplay(self, mode, 0), _PickReplay(self, mode, 1)]])
        self._token_on_device = None


@pytest.mark.parametrize("fake_graph", [False, True])
def test_greedy_step_feeds_back_on_the_device(tmp_path, fake_graph):
    """DecodeStep.greedy(token) returns what argmax over the valid ids of step(token) would, and the
    Generator's greedy decoding through it yields the tokens of the plain sampler path. With the
    (faked, on CPU) greedy graph, the argmax is written into the next step's token buffer, and a call
    whose token is that id does not upload it again."""
    cfg = tiny_config()
    model = load_model(write_checkpoint(hf_model(cfg, seed=8), cfg, tmp_path / "c"), "cpu", torch.float32)
    n_valid = cfg.vocab_size - 7  # padding ids at the end are never chosen

    class FakeGraphStep(_FakePickGraphStep):
        fills = 0

    prompt = list(range(3, 30))
    sp = SamplingParams(temperature=0, max_new_tokens=12)
    want = Generator(model, DecodeState(cfg, 128)).generate(prompt, sp, n_valid=n_valid)
    st = DecodeState(cfg, 128)
    step = (FakeGraphStep if fake_graph else DecodeStep)(model, st, use_graph=fake_graph)
    if fake_graph:
        real_fill = step.token.fill_

        def counting_fill(v):
            FakeGraphStep.fills += 1
            return real_fill(v)
        step.token.fill_ = counting_fill
    gen = Generator(model, st, step_fn=step)
    got = gen.generate(prompt, sp, n_valid=n_valid)
    assert got == want and gen.stats.gen_tokens == 12
    assert st.tokens == prompt + got[:-1]  # the last id is returned, not fed
    if fake_graph:
        assert FakeGraphStep.fills == 1  # only the first id (sampled from the prefill logits) is uploaded
        assert set(step.pick_graphs) == {"greedy"}  # greedy decoding captured the greedy graph only
    # the direct call against the step's logits
    st2 = DecodeState(cfg, 128)
    with torch.no_grad():
        model(torch.tensor([prompt]), st2)
    ref = DecodeStep(model, st2, use_graph=False)
    st3 = DecodeState(cfg, 128)
    with torch.no_grad():
        model(torch.tensor([prompt]), st3)
    g = DecodeStep(model, st3, use_graph=False)
    for t in (5, 9):
        assert g.greedy(t, n_valid) == int(ref(t)[:n_valid].argmax())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_greedy_graph_on_cuda_matches_the_logits_path(tmp_path, kv):
    """On the GPU: the greedy graph (argmax and token feedback inside the graph) picks the ids that
    argmax over the logits of the plain graph step picks, for a bf16 model."""
    cfg = tiny_config()
    path = write_checkpoint(hf_model(cfg, seed=6), cfg, tmp_path / "c")
    prompt = torch.randint(1, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    seqs = []
    for greedy in (False, True):
        model = load_model(path, "cuda", torch.bfloat16)
        st = DecodeState(cfg, 128, "cuda", torch.bfloat16, kv_cache=kv)
        with torch.inference_mode():
            tok = int(model(prompt.cuda(), st)[0, -1].argmax())
        step = DecodeStep(model, st)
        out = []
        for _ in range(16):
            tok = step.greedy(tok) if greedy else int(step(tok).argmax())
            out.append(tok)
        seqs.append((out, list(st.tokens)))
    assert seqs[0] == seqs[1]


def test_sample_graph_draws_from_the_step_logits(tmp_path):
    """DecodeStep.sample with the (faked, on CPU) sampling graph: every drawn id lies in the top-k of
    the logits the eager model gives for the same history, the same seed repeats the same ids, and the
    Generator's sampling path uses it after the first token."""
    cfg = tiny_config()
    model = load_model(write_checkpoint(hf_model(cfg, seed=9), cfg, tmp_path / "c"), "cpu", torch.float32)
    sp = SamplingParams(temperature=1.5, top_k=5, max_new_tokens=10, seed=123)

    FakeGraphStep = _FakePickGraphStep

    prompt = list(range(3, 25))
    runs = []
    for _ in range(2):
        st = DecodeState(cfg, 128)
        step = FakeGraphStep(model, st, use_graph=True)
        gen = Generator(model, st, step_fn=step)
        runs.append(gen.generate(prompt, sp))
    assert runs[0] == runs[1] and len(runs[0]) == 10
    assert len(set(runs[0])) > 1  # a temperature of 1.5 over 5 ids: not a constant sequence
    eager = DecodeState(cfg, 128)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), eager)[0, -1]
        for tok in runs[0]:
            assert tok in torch.topk(logits, 5).indices.tolist()
            logits = model(torch.tensor([[tok]]), eager)[0, -1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
def test_sample_graph_on_cuda(tmp_path):
    """On the GPU: the sampling graph's ids lie in the top-k of the plain graph step's logits for the
    same tokens, and a seed repeats them."""
    cfg = tiny_config()
    path = write_checkpoint(hf_model(cfg, seed=6), cfg, tmp_path / "c")
    prompt = torch.randint(1, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    sp = SamplingParams(temperature=1.5, top_k=6, top_p=0.97, min_p=0.01)
    model = load_model(path, "cuda", torch.bfloat16)
    seqs = []
    for _ in range(2):
        st, ref = (DecodeState(cfg, 128, "cuda", torch.bfloat16) for _ in range(2))
        with torch.inference_mode():
            logits = model(prompt.cuda(), st)[0, -1]
            model(prompt.cuda(), ref)
        step, ref_step = DecodeStep(model, st), DecodeStep(model, ref)
        step.seed_sampler(7)
        tok, out = int(logits.argmax()), []
        for _ in range(16):
            nxt = step.sample(tok, sp)
            allowed = torch.topk(ref_step(tok).float(), 6).indices.tolist()
            assert nxt in allowed
            out.append(nxt)
            tok = nxt
        seqs.append(out)
    assert seqs[0] == seqs[1] and len(set(seqs[0])) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
def test_fused_sampler_graph_on_cuda(tmp_path):
    """On the GPU, the chat's default sampling (no top-k) draws with kernels.sample inside the graph:
    every id lies in the support of generate.sampling_probs over the plain step's logits (or ties with its
    edge), a seed repeats
    the whole reply (the capture's warm-up draws do not shift it), and the torch form still runs when
    the fused sampler is off."""
    from olmo_local.generate import sampling_probs

    cfg = tiny_config()
    path = write_checkpoint(hf_model(cfg, seed=6), cfg, tmp_path / "c")
    prompt = torch.randint(1, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    sp = SamplingParams(temperature=0.8, top_p=0.9, min_p=0.02)
    model = load_model(path, "cuda", torch.bfloat16)
    for fused in (True, False):
        DecodeStep.fused_sampler = fused
        try:
            seqs = []
            st, ref = (DecodeState(cfg, 128, "cuda", torch.bfloat16) for _ in range(2))
            with torch.inference_mode():
                logits = model(prompt.cuda(), st)[0, -1]
                model(prompt.cuda(), ref)
            step, ref_step = DecodeStep(model, st), DecodeStep(model, ref)
            snap, ref_snap = st.snapshot(), ref.snapshot()
            for _ in range(2):  # the same seed twice on one step: the first call also captures
                st.restore(snap)
                ref.restore(ref_snap)
                step.seed_sampler(7)
                tok, out = int(logits.argmax()), []
                for _ in range(16):
                    nxt = step.sample(tok, sp)
                    lg = ref_step(tok).float()
                    probs, p = sampling_probs(lg, sp), torch.softmax(lg / sp.temperature, 0)
                    # in the support, or tied (same p) with its last token: the kernel keeps whole ties
                    assert float(probs[nxt]) > 0 or float(p[nxt]) == float(p[probs > 0].min())
                    out.append(nxt)
                    tok = nxt
                seqs.append(out)
            assert seqs[0] == seqs[1] and len(set(seqs[0])) > 1
        finally:
            DecodeStep.fused_sampler = True


def _take(it, close_after=None):
    """The ids an iterator yields; with close_after, the consumer stops (closes it) after that many."""
    out = []
    for tok in it:
        out.append(tok)
        if len(out) == close_after:
            it.close()
            break
    return out


def _greedy_reference(model, cfg, prompt, n, n_valid=None):
    """Greedy ids and the state after feeding prompt + those ids one at a time (the eager model)."""
    st = DecodeState(cfg, 128)
    ids = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), st)[0, -1]
        for _ in range(n):
            ids.append(int(logits[:n_valid].argmax()))
            logits = model(torch.tensor([[ids[-1]]]), st)[0, -1]
    return ids, st


def test_picks_keep_one_step_in_flight(tmp_path):
    """greedy_picks launches the step that feeds id k before it reads id k (two host slots, used in
    turn), yields the greedy ids, and launches nothing past its limit."""
    cfg = tiny_config()
    model = load_model(write_checkpoint(hf_model(cfg, seed=8), cfg, tmp_path / "c"), "cpu", torch.float32)
    prompt = list(range(3, 30))
    want, _ = _greedy_reference(model, cfg, prompt, 7)
    st = DecodeState(cfg, 128)
    with torch.no_grad():
        model(torch.tensor([prompt]), st)
    step = _FakePickGraphStep(model, st, use_graph=True)
    got = list(step.greedy_picks(want[0], 6))
    assert got == want[1:]
    assert step.log == [("launch", 0), ("launch", 1), ("read", 0), ("launch", 0), ("read", 1), ("launch", 1),
                        ("read", 0), ("launch", 0), ("read", 1), ("launch", 1), ("read", 0), ("read", 1)]
    assert st.pos == len(prompt) + 6 == int(st.pos_t) and st.tokens == prompt + want[:6]


@pytest.mark.parametrize("how", ["stop", "close", "context"])
def test_pipelined_stream_books_the_step_in_flight(tmp_path, how):
    """Generator.stream on a pipelined step yields what the one-step-at-a-time path yields. When it ends
    on a stop id, or the consumer stops reading, the step in flight has fed the last id: the state holds
    it (host bookkeeping, device position and the recurrent state agree with feeding those tokens). A
    full context ends the reply where the one-step path ends it."""
    cfg = tiny_config()
    model = load_model(write_checkpoint(hf_model(cfg, seed=8), cfg, tmp_path / "c"), "cpu", torch.float32)
    prompt = list(range(3, 30))
    ref, _ = _greedy_reference(model, cfg, prompt, 10)
    stop = ref[5]
    assert stop not in ref[:5]  # (seeded) the sixth id is new, so it stops the reply there
    max_ctx = len(prompt) + 6 if how == "context" else 128
    runs = []
    for pipelined in (False, True):
        st = DecodeState(cfg, max_ctx)
        step = _FakePickGraphStep(model, st, use_graph=True)
        step.pipelined = pipelined
        gen = Generator(model, st, step_fn=step)
        sp = SamplingParams(temperature=0, max_new_tokens=20)
        it = gen.stream(prompt, sp, stop_ids={stop} if how == "stop" else frozenset())
        out = _take(it, 4 if how == "close" else None)
        runs.append((out, gen.stats.stop_reason, list(st.tokens), st))
    (out0, why0, toks0, _), (out1, why1, toks1, st1) = runs
    assert out1 == out0 and why1 == why0
    if how == "stop":
        assert out1 == ref[:5] and why1 == "stop"
        assert toks0 == prompt + ref[:5] and toks1 == prompt + ref[:6]  # the stop id fed by the step in flight
    elif how == "close":
        assert out1 == ref[:4] and toks0 == prompt + ref[:3] and toks1 == prompt + ref[:4]
    else:
        assert why1 == "context" and toks1 == toks0 and st1.pos == max_ctx
    assert st1.pos == len(toks1) == int(st1.pos_t)
    _, want_state = _greedy_reference(model, cfg, prompt, len(toks1) - len(prompt))
    assert torch.allclose(st1.rec_state, want_state.rec_state, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
@pytest.mark.parametrize("kind", ["greedy", "sample-fused", "sample-torch"])
def test_picks_on_cuda_equal_one_step_at_a_time(tmp_path, kind):
    """On the GPU, greedy_picks / sample_picks (two pick graphs, one step in flight) give the ids and the
    state that as many greedy() / sample() calls give (same seed); closing early books the step in flight."""
    cfg = tiny_config()
    path = write_checkpoint(hf_model(cfg, seed=6), cfg, tmp_path / "c")
    prompt = torch.randint(1, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=0 if kind == "sample-fused" else 8)
    model = load_model(path, "cuda", torch.bfloat16)
    runs = []
    for pipelined in (False, True, "close"):
        st = DecodeState(cfg, 128, "cuda", torch.bfloat16)
        with torch.inference_mode():
            tok = int(model(prompt.cuda(), st)[0, -1].argmax())
        step = DecodeStep(model, st)
        step.seed_sampler(11)
        if pipelined:
            it = step.greedy_picks(tok, 12) if kind == "greedy" else step.sample_picks(tok, sp, 12)
            out = _take(it, 5 if pipelined == "close" else None)
        else:
            out = []
            for _ in range(12):
                tok = step.greedy(tok) if kind == "greedy" else step.sample(tok, sp)
                out.append(tok)
        torch.cuda.synchronize()
        runs.append((out, list(st.tokens), st.pos, int(st.pos_t), st.rec_state.clone()))
    (o0, t0, p0, d0, r0), (o1, t1, p1, d1, r1), (o2, t2, p2, d2, _) = runs
    assert o1 == o0 and t1 == t0 and p1 == p0 == d1 == d0 and torch.equal(r1, r0)
    assert len(set(o0)) > 1 or kind == "greedy"
    assert o2 == o0[:5] and t2 == t0[:len(t0) - 6] and p2 == d2 == len(t2)  # the step feeding o0[4] was in flight


def test_long_caches_switch_graphs_by_position(tmp_path, monkeypatch):
    """A cache of LONG_CTX_LAUNCH positions or more gets one pick graph pair per regime: steps below
    long_ctx_from replay the short-context capture (attention tuned for a 16K cache), later ones the
    long one, also in the middle of a pipelined run; the ids are the greedy ids either way."""
    from olmo_local.kernels.attention_decode import LONG_CTX_LAUNCH

    cfg = tiny_config()
    model = load_model(write_checkpoint(hf_model(cfg, seed=8), cfg, tmp_path / "c"), "cpu", torch.float32)
    prompt = list(range(3, 30))
    want, _ = _greedy_reference(model, cfg, prompt, 7)
    hints = []

    class TwoRegimes(_FakePickGraphStep):
        def capture(self, mode=None):
            pairs = []
            for r, hint in enumerate(self._hints()):
                pairs.append([_PickReplay(self, mode, 0), _PickReplay(self, mode, 1)])
                for g in pairs[-1]:
                    g.regime = r
            self.pick_graphs[mode[0]] = (mode, pairs)
            self._token_on_device = None

        def forward(self, advance=True):
            hints.append(self._hints()[self._regime(self.state.pos)])
            return super().forward(advance)

    st = DecodeState(cfg, LONG_CTX_LAUNCH)
    with torch.no_grad():
        model(torch.tensor([prompt]), st)
    step = TwoRegimes(model, st, use_graph=True)
    assert step._hints() == [LONG_CTX_LAUNCH - 1, LONG_CTX_LAUNCH]
    monkeypatch.setattr(step, "long_ctx_from", len(prompt) + 3)
    assert list(step.greedy_picks(want[0], 6)) == want[1:]
    # the steps at positions len(prompt) .. + 5: three below long_ctx_from, three from it on
    assert hints == [LONG_CTX_LAUNCH - 1] * 3 + [LONG_CTX_LAUNCH] * 3
    small = TwoRegimes(model, DecodeState(cfg, 128), use_graph=True)
    assert small._hints() == [128] and small._regime(10**6) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
def test_long_cache_graphs_on_cuda_cross_the_regime_boundary(tmp_path):
    """On the GPU with a 16K cache: the greedy graphs switch from the short- to the long-context capture
    in the middle of a pipelined run and pick what the same step without graphs picks, token by token."""
    from olmo_local.kernels.attention_decode import LONG_CTX_LAUNCH

    cfg = tiny_config()
    path = write_checkpoint(hf_model(cfg, seed=6), cfg, tmp_path / "c")
    model = load_model(path, "cuda", torch.float32)
    prompt = torch.randint(1, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    runs = []
    for graph in (False, True):
        st = DecodeState(cfg, LONG_CTX_LAUNCH, "cuda", torch.float32)
        with torch.inference_mode():
            tok = int(model(prompt.cuda(), st)[0, -1].argmax())
        step = DecodeStep(model, st, use_graph=graph)
        step.long_ctx_from = 46
        if graph:
            out = list(step.greedy_picks(tok, 12))
        else:
            out = []
            for _ in range(12):
                tok = step.greedy(tok)
                out.append(tok)
        runs.append((out, list(st.tokens)))
    assert runs[0] == runs[1]


def fp32_copy(model):
    """The same (quantized) model computing in fp32: float parameters and buffers in fp32, the q8
    embedding's output too; the packed weights unchanged."""
    import copy

    from olmo_local.quant.linear import QEmbedding

    m = copy.deepcopy(model).to(torch.float32)
    if isinstance(m.embed, QEmbedding):
        m.embed.dtype = torch.float32
    return m


def test_fp32_copy_computes_the_same_model_in_fp32():
    """fp32_copy (the reference of the GPU fold test) keeps the quantized weights and only widens the
    arithmetic: its logits match the bf16 model's within bf16 noise, on the CPU paths."""
    from olmo_local.bench_synth import build_synthetic
    from olmo_local.config import preset

    cfg = preset("tiny", num_hidden_layers=4)
    model = build_synthetic(cfg, "cpu", "q4", seed=0, group_size=32)
    ref = fp32_copy(model)
    assert ref.dtype == torch.float32 and model.dtype == torch.bfloat16
    sa, sb = model.state_dict(), ref.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not sa[k].is_floating_point())
    ids = torch.randint(1, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(ids)[0].float(), ref(ids)[0]
    assert b.dtype == torch.float32 and ((a - b).norm() / b.norm()).item() < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with OLMO_LOCAL_TEST_GPU=1)")
def test_folded_norms_on_cuda_match_the_norm_launches(monkeypatch):
    """On the GPU, a q4 model at the 1B widths (group 128, tiled: the folded norms, the a|b rows beside the
    in-projection, its conv epilogue and the o projection's head rstd run in the kernels) decodes the same
    tokens as the step with the norm launches, both in bf16, and each is compared with the same weights in
    fp32 (TF32 off): the folded path stays within the bf16 noise of the unfolded one (the two bf16 paths
    round in different places, so they are compared with the fp32 truth rather than with each other)."""
    from olmo_local.bench_synth import build_synthetic
    from olmo_local.config import preset

    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the fp32 reference (torch 2.11 has no allow_tf32)
    cfg = preset("1b", num_hidden_layers=8)
    prompt = torch.randint(1, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5)).cuda()
    toks = torch.randint(1, cfg.vocab_size, (8,), generator=torch.Generator().manual_seed(6)).tolist()
    runs = []
    model = build_synthetic(cfg, "cuda", "q4", seed=0)
    try:
        for folds, dtype in ((False, torch.float32), (False, torch.bfloat16), (True, torch.bfloat16)):
            m = fp32_copy(model) if dtype == torch.float32 else model
            monkeypatch.setattr(DecodeStep, "fold_norms", folds)
            st = DecodeState(cfg, 64, "cuda", dtype)
            with torch.inference_mode():
                m(prompt, st)
                step = DecodeStep(m, st, use_graph=False)
                runs.append(([step(t).float() for t in toks], st.rec_state.clone()))
    finally:
        torch.set_float32_matmul_precision(prec)
    (lr, rr), (l0, r0), (l1, r1) = runs

    def err(ls, rs):
        e = max(((a - b).norm() / b.norm()).item() for a, b in zip(ls, lr))
        return e, ((rs - rr).norm() / rr.norm()).item()

    (e0, s0), (e1, s1) = err(l0, r0), err(l1, r1)
    # bf16 against fp32 at random 1B-width weights: ~5e-2 (H200); a broken kernel gives ~1
    assert e0 < 0.15 and s0 < 0.15, (e0, s0)
    assert e1 < 1.5 * e0 + 5e-3 and s1 < 1.5 * s0 + 5e-3, (e0, e1, s0, s1)


def test_static_step_with_nf4_linears_takes_the_fused_kernel(tmp_path, monkeypatch):
    """nf4 linears (bitsandbytes layout, blocksize 64): the step's projections go through the fused nf4
    GEMV (kernels.gemv_nf4 under the interpreter; on CUDA it is the default) and equal the eager forward,
    which dequantizes each layer; the absmax is converted once and kept on the module."""
    pytest.importorskip("bitsandbytes")
    import olmo_local.decode as dec
    from olmo_local.kernels import gemv_nf4 as kn
    from olmo_local.quant.formats import quantize_nf4
    from olmo_local.quant.linear import NF4Linear

    cfg = tiny_config(num_key_value_heads=2, hidden_size=64, intermediate_size=128, linear_key_head_dim=16,
                      linear_value_head_dim=32)
    model = load_model(write_checkpoint(hf_model(cfg, seed=7), cfg, tmp_path / "c"), "cpu", torch.float32)
    n_nf4 = 0
    for layer in model.layers:
        for name, mod in list(layer.named_modules()):
            if name.endswith(("qkvz", "qkv", "o", "gate_up", "down")) and hasattr(mod, "weight"):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], NF4Linear(**{
                    k.replace("qweight", "weight"): v for k, v in quantize_nf4(mod.weight.float()).items()}))
                n_nf4 += 1
    calls = []

    def spy(x, *a, **kw):
        calls.append(a[-1])  # n
        return kn.nf4_gemv_triton(x, *a, **kw)

    monkeypatch.setattr(dec, "use_triton", lambda t: True)
    monkeypatch.setattr(dec, "nf4_gemv", spy)
    prompt = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    eager, static = DecodeState(cfg, 64), DecodeState(cfg, 64)
    with torch.no_grad():
        model(prompt, eager)
        model(prompt, static)
        step = DecodeStep(model, static, use_graph=False)
        for t in (3, 17, 99):
            want = model(torch.tensor([[t]]), eager)[0, -1]
            got = step(t)
            assert (want - got).abs().max().item() < 2e-4
    assert n_nf4 >= 8 and len(calls) == 3 * n_nf4  # every nf4 projection of every step, through the kernel
    assert all(getattr(m, "_absmax_f32", None) is not None for m in model.modules() if isinstance(m, NF4Linear))
