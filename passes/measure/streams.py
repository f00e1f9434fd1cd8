"""Segment-major runs: the base run of a graph and its variants (streams), all pushed through one segment
(passes.measure.segments) before the next, so that each segment's weights are loaded once.

A stream departs from the base run at a residual node R = x' = R(x, a): there R reads another contribution
(zeros: x' = x exactly, the contribution removed; or what another stream had there) and possibly another x
(what the base had at an earlier residual node). From R on it runs on what it computes itself; everything it
reads from before R is the base's. It stops once the inputs of residual node `until` are made, or runs to the
targets. At every residual node of `sites` each stream passes, the consumer is handed that node's inputs x and a
(Observation); at the end each stream that ran there hands over the targets (Output): the base first, then the
streams in the order given. Values stay where onnxruntime made them (on the GPU with --provider cuda, when the
streams' values fit in ACTIVATION_SHARE of its memory, else in host memory) and are dropped as soon as no later
segment reads them. Sessions are opened ahead, in segment order, on a thread of their own while this segment's
streams run (their weights load while these compute), as long as the weights of those waiting stay within
AHEAD_BYTES; the input types they are opened with come from ONNX shape inference where the base has not made
the values yet (inferred_types), and a session opened with a type the base then does not make is opened again.
On the GPU every session takes its activations and outputs from one arena shared by all of them (passes.support.
onnx_io.share_cuda_arena), so that what one segment's runs used serves the next. The values of a run are copied
out of where its session put them (Reductions.own, one run for all) where that session has an arena of its own
(values in host memory; a GPU where no shared arena could be registered: a value left there keeps the closed
session's whole arena), and in the shared arena when they come to COPY_BYTES or more: left in place they pin
holes between the run's freed activations (10 Super-49B layers, 16 GB: peak 7.9 GB with the copies, 11.3 GB
without; 40 layers 21.6 GB against 23.1 GB), while smaller ones cost only the copy's run (SmolLM2's 578 runs,
2.4 MB each value: 0.2 s of a 2.7 s analysis on an H200). bfloat16 models
need the CUDA provider: onnxruntime's CPU kernels do not run bf16, which open_session reports in one line
before any number is made.

Cost (passes.measure.runs.Cost): forward-pass equivalents are the weight-MatMul FLOPs of every segment run by
every stream over those of the whole graph; weights read are the initializer bytes each segment's session
loaded, about 1x the model (constant subgraphs read by several segments, a tied embedding, count each time).
"""
from __future__ import annotations

import subprocess
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
from onnx import helper

from passes.attention.stream import find_stream
from passes.measure.reductions import Reductions
from passes.measure.runs import RUNS, Cost, Removable, open_session, weight_bytes, weight_flops
from passes.measure.segments import A_SLOT, X_SLOT, SegmentPlan, inferred_types, plan_segments, segment_model
from passes.support.graph import GraphIndex
from passes.support.graph_inputs import ort_type_to_onnx
from passes.support.onnx_io import (
    SHARED_ARENA,
    LoadedModel,
    execution_providers,
    resolve_provider,
    run_session,
    share_cuda_arena,
    warm_cuda,
)

BASE = "base"
ZERO = "zeros"
ACTIVATION_SHARE = 0.5      # stream values are kept on the GPU while they fit in this share of its memory
AHEAD_BYTES = 1 << 30       # segments are opened ahead while their weights stay within this (the next one always)
COPY_BYTES = 16 << 20       # the values of a run this big are copied out of the shared arena (see the docstring)
# weights freed with their session; threads that sleep between runs (spinning workers of one session slow the
# reductions and runs that follow: SmolLM2's analysis on 2 cores took 44 s with them, 33 s without)
SESSION_CONFIG = {"session.use_device_allocator_for_initializers": "1", "session.intra_op.allow_spinning": "0",
                  **SHARED_ARENA}


@dataclass(frozen=True)
class Source:
    """What stream `label` (BASE for the base run) had as input `slot` ("x" or "a") of residual node `site`."""
    label: str
    site: int
    slot: str


@dataclass(frozen=True)
class Stream:
    """A variant of the base run departing at residual node `site`, where it reads `a` (ZERO or a Source) as the
    contribution and `x` (a Source; None: the base's) as x; it runs until the inputs of residual node `until`
    are made, or with until None to the targets. `part` names its kind of work in the cost."""
    label: str
    site: int
    until: int | None
    a: Source | str = ZERO
    x: Source | None = None
    part: str = RUNS


@dataclass
class Observation:
    label: str
    site: int          # the residual node
    x: object          # onnxruntime OrtValues
    a: object


@dataclass
class Output:
    label: str
    values: dict       # target name -> OrtValue


@dataclass
class _Live:
    label: str
    first: int                    # first segment it runs
    last: int                     # last segment it runs
    part: str
    slots: dict = field(default_factory=dict)     # X_SLOT / A_SLOT -> value at its first segment
    state: dict = field(default_factory=dict)     # tensor -> value it computed (the base: and the graph inputs)
    runs: dict = field(default_factory=lambda: {"nodes": 0, "seconds": 0.0, "flops": 0.0})


class StreamRuns:
    """Iterate to run (see the module docstring): yields Observation and Output events in segment order."""

    def __init__(self, model: LoadedModel, feeds: Mapping[str, np.ndarray], sites: Sequence[Removable],
                 streams: Sequence[Stream], targets: Sequence[str] = (), *, net: GraphIndex | None = None,
                 provider: str | None = "cpu", progress: bool = True, desc: str = "analysis"):
        self.start = time.perf_counter()
        self.model, self.feeds, self.streams = model, feeds, list(streams)
        self.net = net or GraphIndex.build(model.proto.graph)
        self.provider = resolve_provider(provider)
        self.providers = execution_providers(self.provider)
        if self.provider == "cuda":
            warm_cuda()                 # while the arena registers and the first segment opens
        self.shared_arena = self.provider == "cuda" and share_cuda_arena()
        extra = {s.residual_node: s.residual_ports for s in find_stream(model.proto, self.net).sublayers}
        self.plan: SegmentPlan = plan_segments(self.net, {s.residual_node: s.residual_ports for s in sites}, targets, extra)
        self.sites = {s.residual_node for s in sites}
        self.first = {s.label: self.plan.segment_of(s.site) for s in self.streams}
        final = len(self.plan.segments) - 1
        self.last = {s.label: final if s.until is None else self.plan.segment_of(s.until) - 1 for s in self.streams}
        bad = [s.label for s in self.streams if self.last[s.label] < self.first[s.label]]
        if bad:
            raise ValueError(f"streams {bad} end before they begin")
        self.base_last = max(([final] if targets else []) + [self.plan.segment_of(r) - 1 for r in self.sites] +
                             list(self.last.values()))
        self.total_flops = sum(weight_flops(self.net))
        self.device = self.provider            # where stream values are made: "cpu" or "cuda" (see _place)
        self.reduce = Reductions(self.providers, self.device)
        self.session_seconds = self.session_wait = self.weights_read = self.peak = 0
        self.lives: list[_Live] = []
        self.finished: list[_Live] = []
        self.retained: dict[Source, object] = {}          # values streams take from others, until they depart
        self.per_segment: list[dict] = []
        self.ahead: dict[int, tuple] = {}        # segment -> (input types, its session being opened or opened)
        self.static: dict[str, int] = {}                    # element types from shape inference
        self.progress, self.desc = progress, desc

    # ---------------------------------------------------------------- running
    def __iter__(self) -> Iterator[Observation | Output]:
        import onnxruntime as ort
        from tqdm import tqdm
        base = _Live(BASE, 0, self.base_last, RUNS)
        feeds = {n: np.ascontiguousarray(v) for n, v in self.feeds.items() if n in self.net.inputs}
        self.lives, self.finished, self.retained, self.per_segment = [base], [], {}, []
        self.ahead, self.static = {}, {n: helper.np_dtype_to_tensor_dtype(v.dtype) for n, v in feeds.items()}
        wanted = [src for s in self.streams for src in (s.a, s.x) if isinstance(src, Source)]
        opener = futures.ThreadPoolExecutor(1, thread_name_prefix="onnxruntime-open")
        try:
            with tqdm(total=self.base_last + 1, desc=self.desc, unit="segment", disable=None if self.progress else True,
                      leave=False) as bar:
                self._open_ahead(opener, 0, base)           # typed by the feeds; while it opens (CUDA starts there):
                base.state = {n: ort.OrtValue.ortvalue_from_numpy(v, self.device, 0) for n, v in feeds.items()}
                self.static = {**inferred_types(self.model.proto), **self.static}
                for k in range(self.base_last + 1):
                    for spec in self.streams:
                        if self.first[spec.label] == k:
                            self.lives.append(self._depart(spec, base, wanted))
                    runners = [live for live in self.lives if live.first <= k <= live.last]
                    bar.set_postfix_str(f"{len(runners)} streams")
                    self._open_ahead(opener, k, base)
                    session = self._session(k, base)
                    self._open_ahead(opener, k + 1, base)
                    for live in runners:
                        self._run(session, k, live, base)
                        if live is base:        # what segment k made is typed now
                            self._open_ahead(opener, k + 1, base)
                        yield from self._after(k, live, base, wanted)
                    del session
                    if k == 0 and self.provider == "cuda":
                        self._place(base)
                    self._count_held()
                    self._release(k)
                    bar.update(1)
        finally:                # on an early stop (Ctrl-C, an error) sessions not yet opening are not opened
            opener.shutdown(wait=True, cancel_futures=True)
            self.ahead.clear()

    def _open_ahead(self, opener: futures.Executor, k: int, base: _Live) -> None:
        """Have `opener` open segments k, k + 1, ... in order while the weights of those opened and not yet run
        stay within AHEAD_BYTES (one at least), as far as their inputs can be typed (_input_types)."""
        while k <= self.base_last:
            types = self._input_types(k, base, self.static)
            if k in self.ahead and types is not None and types != self.ahead[k][0]:
                # opened with inferred types the base did not make (it may even have failed): opened again
                self.static.update(types)
                self.ahead.pop(k)[1].cancel()
            if k not in self.ahead:
                held = sum(self.plan.segments[j].weight_bytes for j in self.ahead)
                if (self.ahead and held + self.plan.segments[k].weight_bytes > AHEAD_BYTES) or types is None:
                    return
                self.ahead[k] = (types, opener.submit(self._open, k, types))
            k += 1

    def _input_types(self, k: int, base: _Live, static: dict) -> dict[str, int] | None:
        """The element types of segment k's inputs, as the base made them or else as `static` has them; None
        while one is unknown."""
        segment = self.plan.segments[k]
        types = {}
        for t in (*segment.inputs, *(segment.slots or ())):
            if t in base.state:
                types[t] = ort_type_to_onnx(base.state[t].data_type())
            elif t in static:
                types[t] = static[t]
            else:
                return None
        return types

    def _open(self, k: int, types: dict[str, int]) -> tuple[object, float]:
        """Segment k's session with its inputs declared as `types`, and the seconds it took."""
        start = time.perf_counter()
        session = open_session(segment_model(self.model.proto, self.plan, k, types), self.net, self.model.base_dir,
                               self.providers, SESSION_CONFIG)
        return session, time.perf_counter() - start

    def _session(self, k: int, base: _Live):
        """Segment k's session from the opener (_open_ahead has just reconciled its types with what the base made);
        the base is charged the time waited for it."""
        start = time.perf_counter()
        if k not in self.ahead:
            untyped = [t for t in (*self.plan.segments[k].inputs, *(self.plan.segments[k].slots or ())) if t not in base.state]
            raise ValueError(f"segment {k} reads {untyped}, which no earlier segment made and no input feeds")
        session, seconds = self.ahead.pop(k)[1].result()
        waited = time.perf_counter() - start
        base.runs["seconds"] += waited
        self.session_wait += waited
        self.session_seconds += seconds
        segment = self.plan.segments[k]
        self.weights_read += segment.weight_bytes
        self.per_segment.append({"segment": k, "starts_at": "prologue" if segment.residual is None
                                 else self.net.node_label(segment.residual), "weight_bytes": segment.weight_bytes,
                                 "session_seconds": round(seconds, 4), "runs": 0, "run_seconds": 0.0,
                                 "forward_pass_fraction": round(segment.flops / self.total_flops, 6) if self.total_flops else None})
        return session

    def _run(self, session, k: int, live: _Live, base: _Live) -> None:
        segment = self.plan.segments[k]
        start = time.perf_counter()
        binding = session.io_binding()
        for t in segment.inputs:
            binding.bind_ortvalue_input(t, _view(live, base, t))
        if segment.slots is not None:
            for slot, t in zip((X_SLOT, A_SLOT), segment.slots):
                binding.bind_ortvalue_input(slot, live.slots.get(slot) if k == live.first and slot in live.slots
                                            else _view(live, base, t))
        for t in segment.outputs:
            binding.bind_output(t, self.device, 0)
        run_session(session, None, None, binding=binding)
        values = binding.get_outputs()
        if not (self.shared_arena and self.device == "cuda") or sum(v.tensor_size_in_bytes() for v in values) >= COPY_BYTES:
            values = self.reduce.own(values)
        live.state.update(zip(segment.outputs, values))
        seconds = time.perf_counter() - start
        live.runs["seconds"] += seconds
        self.per_segment[-1]["runs"] += 1
        self.per_segment[-1]["run_seconds"] = round(self.per_segment[-1]["run_seconds"] + seconds, 4)
        live.runs["nodes"] += len(segment.nodes)
        live.runs["flops"] += segment.flops

    def _after(self, k: int, live: _Live, base: _Live, wanted: list) -> Iterator[Observation | Output]:
        """The events of `live` once it ran segment k, and the values later streams take from it."""
        if k + 1 < len(self.plan.segments):
            segment = self.plan.segments[k + 1]
            site = segment.residual
            x, a = (_view(live, base, t) for t in segment.slots)
            for src in wanted:
                if src.label == live.label and src.site == site:
                    self.retained[src] = x if src.slot == "x" else a
            if site in self.sites:
                yield Observation(live.label, site, x, a)
        if k == len(self.plan.segments) - 1 and self.plan.targets:
            yield Output(live.label, {t: _view(live, base, t) for t in self.plan.targets})
            if live is not base:                 # handed over: the consumer keeps what it still needs
                self._count_held()
                for t in self.plan.targets:
                    live.state.pop(t, None)

    def _depart(self, spec: Stream, base: _Live, wanted: list) -> _Live:
        """A stream starting at its first segment, R's x and a as it says (taken from what was retained for it)."""
        live = _Live(spec.label, self.first[spec.label], self.last[spec.label], spec.part)
        for slot, tensor, src in zip((X_SLOT, A_SLOT), self.plan.segments[live.first].slots, (spec.x, spec.a)):
            if src == ZERO:
                live.slots[slot] = self.reduce.zeros_like(base.state[tensor])
            elif src is not None:
                if src not in self.retained:
                    raise ValueError(f"stream {spec.label} departs before {src} is made")
                live.slots[slot] = self.retained[src]
                wanted.remove(src)
                if src not in wanted:
                    del self.retained[src]
        return live

    def _count_held(self) -> None:
        """Update the peak of stream values held, before some are dropped (runs only add to them)."""
        held = [*(v for s in self.lives for v in (*s.state.values(), *s.slots.values())), *self.retained.values()]
        self.peak = max(self.peak, sum(v.tensor_size_in_bytes() for v in {id(v): v for v in held}.values()))

    def _release(self, k: int) -> None:
        """Drop values no later segment reads, and the streams that are done."""
        for live in self.lives:
            done = live.last <= k and live.label != BASE
            live.state = {} if done else {t: v for t, v in live.state.items() if self.plan.last_reader.get(t, -1) > k}
            if live.first <= k:
                live.slots.clear()
        self.finished += [live for live in self.lives if live.last <= k and live.label != BASE]
        self.lives = [live for live in self.lives if live.last > k or live.label == BASE]

    def _place(self, base: _Live) -> None:
        """After the prologue: keep stream values on the GPU if every stream's would fit in ACTIVATION_SHARE of
        its memory, else in host memory."""
        per_stream = sum(v.tensor_size_in_bytes() for v in base.state.values())
        most = max(sum(1 for s in self.streams if self.first[s.label] <= k <= self.last[s.label]) for k in range(self.base_last + 1))
        self.device = "cuda" if per_stream * (most + 1) <= ACTIVATION_SHARE * _device_memory() else "cpu"
        self.reduce.device = self.device

    # ---------------------------------------------------------------- cost
    def cost(self) -> Cost:
        total = self.total_flops
        records: dict[str, dict] = {}
        lives = {live.label: live for live in [*self.lives, *self.finished]}
        for live in (lives[label] for label in [BASE, *(s.label for s in self.streams)] if label in lives):
            label = live.label if live.part == RUNS else live.part
            rec = records.setdefault(label, {"run": label, "part": live.part, "nodes": 0, "seconds": 0.0, "flops": 0.0})
            for key in ("nodes", "seconds", "flops"):
                rec[key] += live.runs[key]
        per_run = [{"run": r["run"], "part": r["part"], "nodes": r["nodes"], "seconds": round(r["seconds"], 4),
                    "forward_pass_fraction": round(r["flops"] / total, 6) if total else None} for r in records.values()]
        return Cost(forward_pass_equivalents=float(sum(r["forward_pass_fraction"] or 0.0 for r in per_run)),
                    node_fraction=sum(r["nodes"] for r in per_run) / max(len(self.net.graph.node), 1),
                    seconds=time.perf_counter() - self.start,
                    session_seconds=self.session_seconds + self.reduce.session_seconds,
                    session_wait_seconds=self.session_wait + self.reduce.session_seconds, runs=len(per_run),
                    per_run=per_run, provider=self.provider, weights_read_bytes=self.weights_read,
                    weights_read_multiple=self.weights_read / max(weight_bytes(self.net), 1), execution="segments",
                    segments=self.base_last + 1, activations="device" if self.device != "cpu" else "host",
                    activation_bytes_peak=self.peak, per_segment=self.per_segment)


def _view(live: _Live, base: _Live, tensor: str):
    """The value of `tensor` as `live` sees it: its own, else the base's."""
    return live.state[tensor] if tensor in live.state else base.state[tensor]


def _device_memory() -> int:
    """Bytes of memory of GPU 0 (nvidia-smi), 0 when it cannot be read."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=30)
        return int(done.stdout.strip().splitlines()[0]) << 20
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 0
