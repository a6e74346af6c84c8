"""The bench runner: llama-bench-style tests over an *engine* (olmo-local's Generator, or transformers).

Tests (each the mean ± stddev over ``reps`` timed runs after one warm-up run):

- ``pp{P}``        prompt processing: P random tokens into an empty state, tokens/s
- ``tg{N}``        text generation: N tokens, each fed back (greedy) from an empty state, tokens/s
- ``tg{N}@d{D}``   the same after the state was filled to depth D (filled once, restored per run)
- ``ttft``         time to first token for a P-token prompt (prefill + first sampled token), ms

olmo-local's decode goes through ``Generator.step`` of the Generator that ``runtime.make_generator``
builds, i.e. the same per-token step the chat uses (``make_step`` is the one place bench gets it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Engine(Protocol):
    name: str
    device: torch.device

    def sync(self) -> None: ...
    def reset(self) -> None: ...
    def prefill(self, ids: list[int]) -> torch.Tensor: ...
    def step(self, token: int) -> torch.Tensor: ...
    def greedy(self, token: int) -> int: ...
    def first_token_s(self, ids: list[int]) -> float: ...
    def fill(self, ids: list[int]) -> None: ...
    def restore(self) -> None: ...
    def drop_fill(self) -> None: ...


def make_step(runtime) -> Callable[[int], torch.Tensor]:
    """The per-token decode step bench times: the runtime's Generator.step (which runs its ``step_fn``,
    e.g. a CUDA graph, when one is plugged in), exactly what the chat calls."""
    return runtime.generator.step


class OursEngine:
    """olmo-local through its Runtime (model + DecodeState + Generator)."""

    name = "olmo-local"

    def __init__(self, runtime) -> None:
        self.rt = runtime
        self.gen, self.state, self.device = runtime.generator, runtime.state, runtime.device
        self._step = make_step(runtime)
        self._snap = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.state.reset()

    def prefill(self, ids: list[int]) -> torch.Tensor:
        return self.gen.prefill(ids)

    def step(self, token: int) -> torch.Tensor:
        return self._step(token)

    def greedy(self, token: int) -> int:
        """Feed ``token``, return the argmax id: Generator.greedy_step, what a greedy chat calls (on
        CUDA the argmax and the token feedback are inside the step's graph)."""
        return self.gen.greedy_step(token)

    def greedy_picks(self, first: int, n: int) -> Iterator[int] | None:
        """The ids of ``n`` greedy steps from ``first`` through the step's pipelined picks (one step in
        flight, as Generator.stream decodes a greedy chat); None when the step has none (then greedy()
        per token)."""
        step = self.gen.step_fn
        return step.greedy_picks(first, n) if getattr(step, "pipelined", False) else None

    def first_token_s(self, ids: list[int]) -> float:
        """Through Generator.stream, as the chat does: its own ttft (prefill + sampling the first token)."""
        from olmo_local.generate import SamplingParams

        self.reset()
        self.sync()
        self.gen.generate(ids, SamplingParams(temperature=0, max_new_tokens=1))
        return self.gen.stats.ttft_s

    def fill(self, ids: list[int]) -> None:
        self.reset()
        self.gen.prefill(ids)
        self._snap = self.state.snapshot()

    def restore(self) -> None:
        self.state.restore(self._snap)

    def drop_fill(self) -> None:
        self._snap = None


@dataclass
class BenchSpec:
    n_prompt: int = 512
    n_gen: int = 128
    depths: list[int] = field(default_factory=list)
    reps: int = 5
    seed: int = 0

    def tests(self) -> list[tuple[str, str, int]]:
        """(name, kind, depth) in run order."""
        out: list[tuple[str, str, int]] = []
        if self.n_prompt > 0:
            out.append((f"pp{self.n_prompt}", "pp", 0))
        if self.n_gen > 0:
            out.append((f"tg{self.n_gen}", "tg", 0))
            out += [(f"tg{self.n_gen}@d{d}", "tg", d) for d in self.depths if d > 0]
        if self.n_prompt > 0:
            out.append(("ttft", "ttft", 0))
        return out

    def ctx_needed(self) -> int:
        deep = max([0, *self.depths]) + self.n_gen if self.n_gen > 0 else 0
        return max(self.n_prompt + 1, deep + 1, 16)


@dataclass
class Measurement:
    test: str
    kind: str  # pp | tg | ttft
    n_prompt: int
    n_gen: int
    depth: int
    samples: list[float]  # tokens/s (pp, tg) or ms (ttft)

    @property
    def unit(self) -> str:
        return "ms" if self.kind == "ttft" else "t/s"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")

    @property
    def stddev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    @property
    def mean_depth(self) -> float:
        """Mean number of cached positions a tg step attends over: D + (N + 1) / 2."""
        return self.depth + (self.n_gen + 1) / 2 if self.kind == "tg" else 0.0


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _timed(engine: Engine, fn: Callable[[], object]) -> float:
    engine.sync()
    t0 = time.perf_counter()
    fn()
    engine.sync()
    return time.perf_counter() - t0


def _decode(engine: Engine, first: int, n: int) -> None:
    picks = engine.greedy_picks(first, n) if hasattr(engine, "greedy_picks") else None
    if picks is not None:
        for _ in picks:
            pass
        return
    tok = first
    for _ in range(n):
        tok = engine.greedy(tok)  # greedy feedback: the id reaches the host every token, like the chat


def run_tests(engine: Engine, spec: BenchSpec, vocab: int,
              progress: Callable[[str], None] | None = None) -> list[Measurement]:
    """Run every test of ``spec`` on ``engine``; the same token ids for every engine."""
    say = progress or (lambda msg: None)
    prompt = random_ids(spec.n_prompt, vocab, spec.seed)
    first = random_ids(1, vocab, spec.seed + 1)[0]
    out: list[Measurement] = []
    with torch.inference_mode():
        for name, kind, depth in spec.tests():
            m = Measurement(name, kind, spec.n_prompt if kind != "tg" else 0,
                            spec.n_gen if kind == "tg" else 0, depth, [])
            if kind == "tg" and depth:
                say(f"{engine.name}: filling the state to depth {depth}")
                engine.fill(random_ids(depth, vocab, spec.seed + 2 + depth))
            for r in range(spec.reps + 1):  # run 0 is the warm-up
                say(f"{engine.name}: {name} " + ("warm-up" if r == 0 else f"run {r}/{spec.reps}"))
                if kind == "pp":
                    engine.reset()
                    dt = _timed(engine, lambda: engine.prefill(prompt))
                    val = spec.n_prompt / dt
                elif kind == "ttft":
                    val = engine.first_token_s(prompt) * 1000.0
                else:
                    engine.restore() if depth else engine.reset()
                    dt = _timed(engine, lambda: _decode(engine, first, spec.n_gen))
                    val = spec.n_gen / dt
                if r:
                    m.samples.append(val)
            if kind == "tg" and depth:
                engine.drop_fill()
            out.append(m)
    return out
