"""Prompt prefill through CUDA graphs: a prompt of up to the largest bucket's length (a chat turn, fresh or
continuing the conversation) is padded to the next bucket length and runs as one graph replay.

Why: the eager prefill of a 512-token prompt issues ~850 launches from Python (Triton kernels, cuBLAS
GEMMs, torch ops) and on an H200 that took ~36 ms of host time against ~29 ms of GPU work, so time to
first token followed the host's pace (35-86 ms across bench processes in session 11), and a 40-token chat
turn cost as much host time as a 512-token one. A replay costs the host microseconds, whatever the host.

How the padding stays exact (olmo_local.model: ``forward(..., valid=n)``): the prompt's n tokens come
first and everything is causal, so no real token sees a pad; the pads' GDN gates are no-ops (no decay, no
write), the conv state is taken as of token n, the pads' KV rows lie past the prompt (the next tokens
overwrite them) and the logits are token n - 1's. n and the position live on the device (the attention
reads the cache up to the position: kernels/attention_cached.py), so one graph serves every length of its
bucket at every position. Prompts longer than the largest bucket, or whose pads would not fit the context,
take the eager path.

Graphs are captured lazily, on the first prompt of each bucket (a warm-up run, then the capture; both write
the state, which is put back afterwards: from a snapshot, or zeroed at position 0, which holds nothing). All of them share one memory pool: they never run
concurrently, and each replay's logits are copied out before the next one.
"""

from __future__ import annotations

import sys

import torch

from olmo_local.state import DecodeState

# padded prompt lengths (tokens); prompts longer than the last one prefill eagerly
BUCKETS = (16, 32, 64, 128, 256, 512)


class PrefillGraphs:
    def __init__(self, model: torch.nn.Module, state: DecodeState, use_graph: bool = True,
                 buckets: tuple[int, ...] = BUCKETS) -> None:
        self.model, self.state = model, state
        self.buckets = tuple(sorted(buckets))
        self.use_graph = use_graph and state.device.type == "cuda"
        self.enabled = True
        dev = state.device
        self.tokens = torch.zeros(1, self.buckets[-1], dtype=torch.long, device=dev)
        self.valid = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._keep: list[torch.Tensor] = []  # buffers outside the pool that the graphs read (dequant scratch)
        self.replays = 0  # prefills served (tests)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if n <= b), None)

    def fits(self, n: int) -> bool:
        """Whether a prompt of n tokens takes this path: a bucket for n, room for its pads in the context."""
        b = self.bucket(n)
        return self.enabled and n > 0 and b is not None and self.state.pos + b <= self.state.max_ctx

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.tokens[:, :b], self.state, last_only=True, valid=self.valid)[0, -1]

    def _put_back(self, snap) -> None:
        if snap is not None:
            self.state.restore(snap)
        else:
            self.state.conv_state.zero_()
            self.state.rec_state.zero_()

    def _capture(self, b: int) -> bool:
        dev = self.state.device
        # the warm-up and the capture write the GDN states: put them back afterwards (at position 0 they hold
        # nothing, so zeroing them is the restore, without a snapshot's copy: 53 MB for the 7B at the peak)
        snap = self.state.snapshot() if self.state.pos else None
        try:
            s = torch.cuda.Stream(device=dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                self._forward(b)  # compiles the kernels, sizes the dequant scratch and cuBLAS workspaces
            torch.cuda.current_stream(dev).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(b)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # a capture the runtime refuses: stay eager
            self.enabled = False
            self._put_back(snap)
            print(f"olmo-local: prefill graphs off ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                  file=sys.stderr)
            return False
        from olmo_local.kernels.dequant import _SCRATCH

        self._pool = self._pool or graph.pool()
        self._keep = list({id(t): t for t in [*self._keep, *_SCRATCH.values()]}.values())
        self.graphs[b] = (graph, out)
        self._put_back(snap)
        torch.cuda.synchronize(dev)
        return True

    @torch.inference_mode()
    def __call__(self, ids: list[int]) -> torch.Tensor | None:
        """Prefill ``ids`` into the state (continuing its sequence) and advance it; the logits [V] after the last
        one. None when the graph could not be captured (the caller prefills eagerly)."""
        n = len(ids)
        b = self.bucket(n)
        if not self.fits(n):
            raise ValueError(f"a {n}-token prompt at position {self.state.pos} does not take the prefill graphs")
        self.tokens[0, :n].copy_(torch.tensor(ids, dtype=torch.long))
        self.valid.fill_(n)
        if self.use_graph:
            if b not in self.graphs and not self._capture(b):
                return None
            graph, out = self.graphs[b]
            graph.replay()
            logits = out.clone()  # the pool is shared: the next replay may overwrite out
        else:  # the same padded forward, eagerly (on CPU: what the tests compare)
            logits = self._forward(b)
        self.state.advance_ids(ids)
        self.replays += 1
        return logits
