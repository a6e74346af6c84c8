"""Generation: chunked prefill, token-by-token decode, sampling, stop tokens, timing.

``Generator.stream`` yields token ids as they are sampled. The state holds exactly the tokens fed to
the model (``state.tokens``): a sampled stop token, or the last token when ``max_new_tokens`` is reached,
is NOT fed, so a chat turn continues by feeding whatever the next prompt adds to ``state.tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from olmo_local.state import DecodeState


@dataclass
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # 1 = off (llama.cpp semantics)
    repeat_last_n: int = 64
    seed: int | None = None
    max_new_tokens: int = 512

    def validate(self) -> None:
        from olmo_local.errors import OlmoError
        if self.temperature < 0:
            raise OlmoError("temperature must be >= 0")
        if self.top_k < 0:
            raise OlmoError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise OlmoError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise OlmoError("min_p must be in [0, 1)")
        if self.repeat_penalty <= 0:
            raise OlmoError("repeat_penalty must be > 0")
        if self.max_new_tokens < 0:
            raise OlmoError("max_new_tokens must be >= 0")


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to fp32 logits [V] (temperature > 0): the
    probabilities a token is drawn from. Fixed-shape ops only (no boolean indexing, which would sync
    with the host), so the CUDA-graph sampler records the same function."""
    x = logits / p.temperature
    if p.top_k > 0 and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    probs = torch.softmax(x, -1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def valid_logits(logits: torch.Tensor, n_valid: int | None) -> torch.Tensor:
    """The logits of the ids < n_valid (the rest are embedding padding, never chosen): a view."""
    return logits if n_valid is None or n_valid >= logits.numel() else logits[:n_valid]


def uses_history(p: SamplingParams) -> bool:
    """Whether a draw depends on the tokens so far (the repetition penalty)."""
    return p.repeat_penalty != 1.0 and p.repeat_last_n != 0


class Sampler:
    """Turns logits into a token id: repetition penalty, temperature, top-k, top-p, min-p."""

    def __init__(self, params: SamplingParams, n_valid: int | None = None, device: str | torch.device = "cpu"):
        params.validate()
        self.p = params
        self.n_valid = n_valid  # ids >= n_valid are embedding padding: never sampled
        self.gen = torch.Generator(device=device)
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    @staticmethod
    def _masked(logits: torch.Tensor, n_valid: int | None) -> torch.Tensor:
        """fp32 copy of the logits with the padding ids (>= n_valid) at -inf."""
        x = logits.float().clone()
        if n_valid is not None and n_valid < x.numel():
            x[n_valid:] = float("-inf")
        return x

    @staticmethod
    def probs(logits: torch.Tensor, params: SamplingParams, n_valid: int | None = None) -> torch.Tensor:
        """sampling_probs of fp32 logits with the padding ids (>= n_valid) excluded (no history)."""
        return sampling_probs(Sampler._masked(logits, n_valid), params)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.p
        x = self._masked(logits, self.n_valid)
        if uses_history(p) and history:
            recent = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
            idx = torch.tensor(sorted(set(recent)), device=x.device, dtype=torch.long)
            v = x[idx]
            x[idx] = torch.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if p.temperature == 0:
            return int(torch.argmax(x))
        probs = sampling_probs(x, p)
        return int(torch.multinomial(probs, 1, generator=self.gen))


@dataclass
class GenStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    gen_tokens: int = 0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    stop_reason: str = ""  # "stop", "length", "context", "interrupted"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from the prefill; decode speed counts the ones after it
        n = self.gen_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0


@dataclass
class Generator:
    model: torch.nn.Module
    state: DecodeState
    prefill_chunk: int = 1024
    prefill_calls: int = 0  # how many prefill passes ran (tests assert regen/undo need none)
    step_fn: Callable[[int], torch.Tensor] | None = None  # e.g. a CUDA-graph step; default eager
    # prompts up to a bucket length through padded CUDA graphs (olmo_local.prefill_graph); None: eager
    prefill_graphs: Any = None
    stats: GenStats = field(default_factory=GenStats)

    def _sync(self) -> None:
        if self.state.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def prefill(self, ids: list[int], progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Feed ``ids`` into the state; return the logits [V] after the last one."""
        self.state.check_room(len(ids))
        self.prefill_calls += 1
        logits = None
        dev = self.state.device
        pg = self.prefill_graphs
        if pg is not None and pg.fits(len(ids)):
            logits = pg(ids)
            if logits is not None:
                if progress:
                    progress(len(ids), len(ids))
                return logits
        for s in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([ids[s:s + self.prefill_chunk]], device=dev)
            logits = self.model(chunk, self.state, last_only=True)[0, -1]
            if progress:
                progress(min(s + self.prefill_chunk, len(ids)), len(ids))
        return logits

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        if self.step_fn is not None:
            return self.step_fn(token)
        t = torch.tensor([[token]], device=self.state.device)
        return self.model(t, self.state)[0, -1]

    def greedy_step(self, token: int, n_valid: int | None = None) -> int:
        """Feed ``token``; return the argmax of the next logits over ids < n_valid. A step function
        with a ``greedy`` method (the CUDA-graph DecodeStep) does the argmax inside its graph (and
        manages inference mode itself: entering it costs microseconds per token)."""
        fn = getattr(self.step_fn, "greedy", None)
        if fn is not None:
            return fn(token, n_valid)
        with torch.inference_mode():
            return int(torch.argmax(valid_logits(self.step(token), n_valid)))

    def stream(self, new_ids: list[int], params: SamplingParams, stop_ids: set[int] | frozenset[int] = frozenset(),
               n_valid: int | None = None) -> Iterator[int]:
        """Feed ``new_ids`` (continuing the state) and yield sampled tokens until a stop token,
        ``max_new_tokens`` or a full context. Stats land in ``self.stats``."""
        sampler = Sampler(params, n_valid, self.state.device)
        st = self.stats = GenStats(prompt_tokens=len(new_ids))
        t0 = time.perf_counter()
        if not new_ids:
            raise ValueError("nothing to feed: the prompt is empty")
        logits = self.prefill(new_ids)
        self._sync()
        st.prefill_s = time.perf_counter() - t0
        history = list(self.state.tokens)
        # no repetition penalty: after the first token the choice happens with the step (on CUDA inside
        # its graph: the argmax, or a draw from sampling_probs with the step's own seeded generator)
        greedy = params.temperature == 0 and not uses_history(params)
        on_device = (not greedy and not uses_history(params) and hasattr(self.step_fn, "sample")
                     and getattr(self.step_fn, "use_graph", False))
        if on_device:
            self.step_fn.seed_sampler(params.seed)
        nxt: int | None = None
        # a step function with picks (the CUDA-graph DecodeStep) keeps one step in flight: the step that
        # feeds a token is launched before the token is checked, so a reply that ends on a stop id leaves
        # that id fed into the state (the chat template's next token after a reply, mostly)
        pipe: Iterator[int] | None = None
        pipelined = (greedy or on_device) and getattr(self.step_fn, "pipelined", False)
        t1 = time.perf_counter()
        try:
            while True:
                if st.gen_tokens >= params.max_new_tokens:
                    st.stop_reason = "length"
                    return
                tok = sampler(logits, history) if nxt is None else nxt
                st.gen_tokens += 1
                if st.gen_tokens == 1:
                    st.ttft_s = time.perf_counter() - t0
                    t1 = time.perf_counter()
                if tok in stop_ids:
                    st.stop_reason = "stop"
                    return
                yield tok
                history.append(tok)
                if st.gen_tokens >= params.max_new_tokens:
                    st.stop_reason = "length"
                    return
                if pipelined:
                    if pipe is None and self.state.room >= 1:
                        left = params.max_new_tokens - st.gen_tokens
                        pipe = (self.step_fn.greedy_picks(tok, left, n_valid) if greedy else
                                self.step_fn.sample_picks(tok, params, left, n_valid))
                    nxt = next(pipe, None) if pipe is not None else None
                    if nxt is None:  # the picks stop only when the context is full (left covers the length)
                        st.stop_reason = "context"
                        return
                    continue
                if self.state.room < 1:
                    st.stop_reason = "context"
                    return
                if greedy:
                    nxt = self.greedy_step(tok, n_valid)
                elif on_device:
                    nxt = self.step_fn.sample(tok, params, n_valid)
                else:
                    logits = self.step(tok)
        except GeneratorExit:
            st.stop_reason = st.stop_reason or "interrupted"
            raise
        finally:
            if pipe is not None:
                pipe.close()  # waits for the step in flight and books it in the state
            st.decode_s = time.perf_counter() - t1

    def generate(self, new_ids: list[int], params: SamplingParams, stop_ids=frozenset(),
                 n_valid: int | None = None) -> list[int]:
        return list(self.stream(new_ids, params, stop_ids, n_valid))
