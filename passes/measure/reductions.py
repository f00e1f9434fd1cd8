"""Per-token statistics computed where the values are: small onnxruntime graphs on the run's provider, in float64,
so that only vectors of one number per token come back to numpy.

For a, b [..., d] (tokens = every position but the last axis; norms over the last axis):
    cosines(a, bs)    for each b of bs, per token 1 - cos(a, b) = |a/|a| - b/|b||^2 / 2; two zero vectors 0, one
                      zero vector 1: the bs of one run stacked on a new first axis (COSINE_BATCH of them at most,
                      COSINE_BYTES of float64 at most, padded with a up to a power of two: a few sessions serve every
                      count), one run instead of one each (SmolLM2's analysis measures 435 of M's distances)
    residual(x, h)    per token 1 - cos(x, x + h) (x + h formed in float64) and |h| / |x| (nan where x = 0)
    next_token(p, q)  for logits [..., vocab]: mean over tokens of KL(softmax(p) || softmax(q)) (log-softmax in
                      float64) and the fraction of tokens whose argmax agrees, TOKEN_CHUNK tokens at a time
    rows(v, r)        the rows r of v [tokens, d] as float32 (float64 stays float64)
    host(v)           v in numpy as float32 (float64 stays float64), wherever v is
    zeros_like(v)     zeros of v's shape and type, on the device the streams live on
    own(vs)           a copy of each of the values vs (Identity from a graph input to a graph output), in memory
                      these reductions own, on the device the streams live on: one run for all of them
These are exactly the numpy rules of passes.measure.metrics (cosine_distance, norm_ratio) and
passes.measure.change (next_token_agreement); tests/test_stream_analysis.py holds them to each other.
"""
from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes.measure.change import TOKEN_CHUNK
from passes.support.graph_inputs import ort_type_to_onnx
from passes.support.onnx_io import SHARED_ARENA, ort_session, run_session

OPSET = 17
D = TensorProto.DOUBLE
# its threads sleep between runs (the segments' runs come next); on the GPU its memory is the segments' shared arena
QUIET = {"session.intra_op.allow_spinning": "0", **SHARED_ARENA}
COSINE_BATCH = 32           # cosines taken in one run at most
COSINE_BYTES = 128 << 20    # ... and as many as stay within this many bytes of float64 together (one at least:
# a Super-49B value, 2,048 x 8,192, is 128 MiB; two a run raised its analysis's peak GPU memory by 1 GB)


def zero_rule(dist: np.ndarray, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """Per-token cosine distance with the zero-vector cases: distance 1 where exactly one of a, b is zero."""
    return np.where((na == 0) != (nb == 0), 1.0, dist)


class _Graph:
    """A tiny graph under construction: nodes named n0, n1, ... with one output each."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        name = f"n{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def const(self, values, data_type: int = TensorProto.INT64) -> str:
        name = f"c{len(self.inits)}"
        array = np.asarray(values)
        self.inits.append(helper.make_tensor(name, data_type, list(array.shape), array.flatten().tolist()))
        return name

    def norm(self, v: str) -> str:
        """|v| over the last axis, keeping it."""
        return self.op("Sqrt", self.op("ReduceSum", self.op("Mul", v, v), self.const([-1]), keepdims=1))

    def unit(self, v: str, n: str) -> str:
        """v / |v|, and v / 1 where |v| = 0 (a zero vector stays zero)."""
        return self.op("Div", v, self.op("Add", n, self.op("Cast", self.op("Equal", n, self.const(0.0, D)), to=D)))

    def half_squared_distance(self, a: str, na: str, b: str, nb: str) -> str:
        diff = self.op("Sub", self.unit(a, na), self.unit(b, nb))
        return self.op("Mul", self.op("ReduceSum", self.op("Mul", diff, diff), self.const([-1]), keepdims=1), self.const(0.5, D))

    def model(self, inputs: list[tuple[str, int]], outputs: list[tuple[str, str]]) -> onnx.ModelProto:
        """outputs: (graph output name, node output) pairs."""
        for out, tensor in outputs:
            self.nodes.append(helper.make_node("Identity", [tensor], [out], name=f"out/{out}"))
        graph = helper.make_graph(self.nodes, "reduction", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                                  [helper.ValueInfoProto(name=out) for out, _ in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="passes.measure.reductions")
        model.ir_version = 8
        return model


def _cosines(t: int, n: int) -> onnx.ModelProto:
    """a against b0 .. b{n-1}, stacked on a new first axis (one b: the axis added to the results, which are small;
    stacking the one b too raised a Super-49B analysis's peak GPU memory by 0.4 GB)."""
    g = _Graph()
    first = g.const([0])
    stacked = "b0" if n == 1 else g.op("Concat", *(g.op("Unsqueeze", f"b{i}", first) for i in range(n)), axis=0)
    a, b = g.op("Cast", "a", to=D), g.op("Cast", stacked, to=D)
    na, nb = g.norm(a), g.norm(b)
    dist = g.half_squared_distance(a, na, b, nb)
    if n == 1:
        dist, nb = g.op("Unsqueeze", dist, first), g.op("Unsqueeze", nb, first)
    return g.model([("a", t), *((f"b{i}", t) for i in range(n))], [("dist", dist), ("na", na), ("nb", nb)])


def _residual(t: int) -> onnx.ModelProto:
    g = _Graph()
    x, h = g.op("Cast", "x", to=D), g.op("Cast", "h", to=D)
    s = g.op("Add", x, h)
    nx, ns = g.norm(x), g.norm(s)
    return g.model([("x", t), ("h", t)], [("dist", g.half_squared_distance(x, nx, s, ns)), ("nx", nx), ("ns", ns),
                                          ("nh", g.norm(h))])


def _rows_2d(g: _Graph, v: str) -> str:
    """v reshaped to [tokens, last axis]."""
    return g.op("Reshape", v, g.op("Concat", g.const([-1]), g.op("Shape", v, start=-1), axis=0))


def _next_token(t: int) -> onnx.ModelProto:
    g = _Graph()

    def log_softmax(v: str) -> str:
        rows = g.op("Cast", g.op("Slice", _rows_2d(g, v), "start", "end", g.const([0])), to=D)
        # each row's max picked at its ArgMax: the value ReduceMax gives, without the ~10 ms each call of
        # onnxruntime's CUDA ReduceMax cost on an H200 whatever the rows (SmolLM2's analysis makes 32)
        top = g.op("GatherElements", rows, g.op("ArgMax", rows, axis=-1, keepdims=1), axis=-1)
        shifted = g.op("Sub", rows, top)
        return g.op("Sub", shifted, g.op("Log", g.op("ReduceSum", g.op("Exp", shifted), g.const([-1]), keepdims=1)))

    lp, lq = log_softmax("p"), log_softmax("q")
    kl = g.op("ReduceSum", g.op("Mul", g.op("Exp", lp), g.op("Sub", lp, lq)), g.const([-1]), keepdims=0)
    agree = g.op("Equal", g.op("ArgMax", lp, axis=-1, keepdims=0), g.op("ArgMax", lq, axis=-1, keepdims=0))
    return g.model([("p", t), ("q", t), ("start", TensorProto.INT64), ("end", TensorProto.INT64)],
                   [("kl", kl), ("agree", agree)])


def _float(t: int) -> int:
    return D if t == D else TensorProto.FLOAT


def _rows(t: int) -> onnx.ModelProto:
    g = _Graph()
    rows = g.op("Cast", g.op("Gather", _rows_2d(g, "v"), "rows", axis=0), to=_float(t))
    return g.model([("v", t), ("rows", TensorProto.INT64)], [("picked", rows)])


def _cast(t: int) -> onnx.ModelProto:
    g = _Graph()
    return g.model([("v", t)], [("cast", g.op("Cast", "v", to=_float(t)))])


def _zeros(t: int) -> onnx.ModelProto:
    g = _Graph()
    zeros = g.op("ConstantOfShape", g.op("Shape", "v"), value=helper.make_tensor("value", t, [1], [0]))
    return g.model([("v", t)], [("zeros", zeros)])


def _own(types: tuple[int, ...]) -> onnx.ModelProto:
    g = _Graph()
    return g.model([(f"v{i}", t) for i, t in enumerate(types)], [(f"copy{i}", f"v{i}") for i in range(len(types))])


_BUILDERS = {"residual": _residual, "next_token": _next_token, "rows": _rows, "cast": _cast,
             "zeros": _zeros}


class Reductions:
    """The reductions of the module docstring on `providers`; results of `zeros_like` stay on `device` ("cpu" or
    "cuda"), everything else comes back to numpy. One session per reduction and element types of the values fed
    (own's graph is built for all of them, the others' for the first), made on first use."""

    def __init__(self, providers: list, device: str):
        self.providers, self.device = providers, device
        self.sessions: dict[tuple[str, int], object] = {}
        self.session_seconds = 0.0

    def _run(self, kind: str, feeds: dict, device: str = "cpu") -> list:
        """Run reduction `kind` for the element types of its OrtValue feeds; outputs bound to `device`."""
        import onnxruntime as ort
        types = tuple(ort_type_to_onnx(v.data_type()) for v in feeds.values() if isinstance(v, ort.OrtValue))
        session = self.sessions.get((kind, types))
        if session is None:
            start = time.perf_counter()
            # the copy runs as written: no graph optimization may remove it
            graph = (_own(types) if kind == "own" else _cosines(types[0], len(types) - 1) if kind == "cosines"
                     else _BUILDERS[kind](types[0]))
            session = self.sessions[kind, types] = ort_session(graph, light=kind == "own",
                                                               providers=self.providers, config=QUIET)
            self.session_seconds += time.perf_counter() - start
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value))
        for output in session.get_outputs():
            binding.bind_output(output.name, device, 0)
        run_session(session, None, None, binding=binding)
        return binding.get_outputs()

    def cosine_batch(self, value) -> int:
        """How many cosines against `value` one run takes: COSINE_BATCH, or the power of two of them whose float64
        stays within COSINE_BYTES (one at least)."""
        most = max(1, min(COSINE_BATCH, COSINE_BYTES // max(8 * int(np.prod(value.shape(), dtype=np.int64)), 1)))
        return 1 << (most.bit_length() - 1)

    def cosines(self, a, bs: list) -> list[np.ndarray]:
        """Per token 1 - cos(a, b) for each b of bs (values of a's shape and type), cosine_batch(a) in a run."""
        most, found = self.cosine_batch(a), []
        for start in range(0, len(bs), most):
            batch = bs[start:start + most]
            padded = batch + [a] * ((1 << (len(batch) - 1).bit_length()) - len(batch))
            dist, na, nb = (v.numpy() for v in self._run("cosines", {"a": a, **{f"b{i}": b for i, b in enumerate(padded)}}))
            found += [zero_rule(d.reshape(-1), na.reshape(-1), n.reshape(-1)) for d, n in zip(dist[:len(batch)], nb)]
        return found

    def residual(self, x, h) -> tuple[np.ndarray, np.ndarray]:
        dist, nx, ns, nh = (v.numpy().reshape(-1) for v in self._run("residual", {"x": x, "h": h}))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(nx > 0, nh / np.where(nx > 0, nx, 1.0), np.nan)
        return zero_rule(dist, nx, ns), ratio

    def next_token(self, p, q) -> tuple[float, float]:
        tokens = int(np.prod(p.shape()[:-1]))
        kl, agree = [], 0
        for start in range(0, tokens, TOKEN_CHUNK):
            bounds = {"start": np.array([start], np.int64), "end": np.array([start + TOKEN_CHUNK], np.int64)}
            k, a = (v.numpy() for v in self._run("next_token", {"p": p, "q": q, **bounds}))
            kl.append(k)
            agree += int(a.sum())
        return float(np.concatenate(kl).mean()), agree / tokens

    def rows(self, value, rows: np.ndarray) -> np.ndarray:
        return self._run("rows", {"v": value, "rows": np.ascontiguousarray(rows, np.int64)})[0].numpy()

    def host(self, value) -> np.ndarray:
        return self._run("cast", {"v": value})[0].numpy()

    def zeros_like(self, value):
        return self._run("zeros", {"v": value}, self.device)[0]

    def own(self, values: list) -> list:
        return self._run("own", {f"v{i}": v for i, v in enumerate(values)}, self.device) if values else []
