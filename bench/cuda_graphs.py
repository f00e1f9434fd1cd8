"""CUDA graphs for the torch benchmarks: capture a step once, replay it."""
from __future__ import annotations


def capture(fn):
    """fn captured in a CUDA graph after a warm-up on a side stream (allocations settle, lazy init happens there);
    returns (graph, static output). The capture is thread-local, so collectives of other ranks may run."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out
