"""Functions of fixed-shape device buffers: called directly (compiled or not), or replayed from CUDA graphs.

The static runners' steps (`static_tree`, `batched_static_tree`) and their prompt encodings (`prompt_encoding`) read
and write only buffers allocated once, so each can be recorded as a CUDA graph after a few warm-up runs and replayed
at the cost of one launch; off CUDA the same functions are simply called. What such a function may do inside a graph
is listed in `static_tree`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

# How `eagle3_compile=True` compiles each step: whole (a graph break would put Python between kernels, and a host read
# there would break capture), with the runner's fixed shapes (automatic dynamic shapes would only add guards), in
# inductor's default mode, which captures no CUDA graphs of its own: the runner captures the compiled step.
COMPILE_OPTIONS: dict[str, Any] = {"backend": "inductor", "fullgraph": True, "dynamic": False}
# Runs of each function before it is captured: compilation, lazy initialisations and library workspaces happen there.
WARMUP_RUNS = 2


def _compile_step(method: Callable[[], Any]) -> Callable[[], Any]:
    """A runner's bound step function compiled with `COMPILE_OPTIONS`, from a copy of its code made for this runner.

    Dynamo keeps compiled code and its guards per code object. With a copy each runner's entries are its own: runners
    for other targets, tree shapes or cache lengths never add up to dynamo's recompile limit (which fails a fullgraph
    function outright), and the entries go away with the runner.
    """
    function = method.__func__
    code = function.__code__.replace()
    copy = types.FunctionType(
        code, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    return torch.compile(types.MethodType(copy, method.__self__), **COMPILE_OPTIONS)


class StepFunction:
    """A function of a runner's buffers: called (compiled or not), or replayed from the CUDA graph it was captured
    into."""

    def __init__(self, function: Callable[[], Any], compiled: bool = False):
        self.function = _compile_step(function) if compiled else function
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None

    def capture(self, pool: Any) -> None:
        """Record the function (running nothing); its outputs become the tensors each replay refreshes."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = self.function()

    def __call__(self) -> Any:
        if self.graph is None:
            self.outputs = self.function()
        else:
            self.graph.replay()
        return self.outputs


def warm_up_steps(steps: Sequence[StepFunction]) -> None:
    """Run `steps`, in order, `WARMUP_RUNS` times."""
    for _ in range(WARMUP_RUNS):
        for step in steps:
            step()


def capture_steps(
    device: torch.device, steps: Sequence[StepFunction], prepare: Callable[[], None] | None = None
) -> None:
    """On a side stream, `prepare` the buffers (when given) and warm `steps` up (`warm_up_steps`: compilation, lazy
    initialisations and library workspaces stay out of the graphs, as torch.cuda.graph requires); then record `steps`,
    in replay order, as CUDA graphs sharing one new memory pool."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if prepare is not None:
                prepare()
            warm_up_steps(steps)
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        for step in steps:
            step.capture(pool)


__all__ = ["COMPILE_OPTIONS", "WARMUP_RUNS", "StepFunction", "capture_steps", "warm_up_steps"]
