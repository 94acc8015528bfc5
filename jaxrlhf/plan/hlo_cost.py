"""Step time and FLOPs from a compiled program's optimized HLO, with every loop counted as often as it runs.

`compiled.cost_analysis()` counts the body of a `while` loop once: for a `lax.scan` over 16 matmuls it
reports 1/16 of the FLOPs, and a scanned 32-layer decoder looks 32 times cheaper than it is. This module
reads the optimized HLO text instead (`compiled.as_text()`) and walks its call graph:

* every `while` gets its trip count from its condition (`i < N`, the form `lax.scan` / `fori_loop` lower
  to; a loop that may also stop early, such as the sampler's, gets its upper bound N);
* each computation's multiplier is the sum over its call sites of the caller's multiplier times the
  trip count (loops nest: micro-batches x layers);
* FLOPs are those of every `dot` and `convolution` (2 x output elements x contracted size), in fusions
  too, times their computation's multiplier;
* time: on TPU the compiler writes its own estimate of each scheduled instruction into the HLO
  (`"estimated_cycles"` in the backend config); their sum, with multipliers, over the chip's clock is
  the compiler's estimate of the step's compute time, loops included;
* Mosaic kernels (splash attention) are custom calls with no cycle estimate: they are counted
  (`kernel_calls`), and the planner adds their time from the arithmetic of their FLOPs;
* collectives (`all-gather`, `reduce-scatter`, `all-reduce`, `all-to-all`, `collective-permute`) carry
  no cycle estimate: their bytes per device, with multipliers, are summed by kind, and `ici_seconds`
  turns them into time with a ring model (see `ring_traffic`).

For a loop-free program the summed cycles over the clock agree with `cost_analysis()["optimal_seconds"]`
(tests/plan/test_hlo_cost.py checks both on programs whose FLOPs are known by arithmetic).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
    "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
COLLECTIVES = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
}  # fmt: skip

_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type as printed: `bf16[8,128]{1,0:T(8,128)}` or a tuple of them
    opcode: str
    operands: list[str]
    args: str  # the operand list as printed (a constant's value: `constant(16)` -> "16")
    attrs: str  # everything after the operand list


@dataclasses.dataclass
class HloCost:
    """A compiled program's cost with loops counted: FLOPs, the compiler's cycles, collective bytes."""

    flops: float  # dot / convolution FLOPs per device (remat recompute included)
    cycles: float  # sum of the TPU compiler's `estimated_cycles` x multipliers (0 on other backends)
    collective_bytes: dict[str, float]  # result bytes per device by collective kind, with multipliers
    collective_traffic: dict[str, float]  # bytes each device sends on the links (ring model), by kind
    loops: list[tuple[str, int]]  # (while instruction, trip count), outermost first
    unknown_loops: list[str]  # loops whose trip count could not be read (counted once)
    flops_once: float  # the same FLOPs with every loop body counted once (what cost_analysis does)
    kernel_calls: float  # Mosaic (Pallas TPU) kernel launches, with multipliers: no cycle estimate

    def compute_seconds(self, clock_hz: float) -> float:
        return self.cycles / clock_hz


def _split_type(text: str) -> tuple[str, str]:
    """`(a, b) op(...)` or `f32[2]{0} op(...)` -> (type, rest): the type may hold spaces and parens."""
    if text.startswith("("):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch in "({"
            depth -= ch in ")}"
            if depth == 0:
                return text[: i + 1], text[i + 1 :].lstrip()
    head, _, rest = text.partition(" ")
    return head, rest


def _parse_instr(line: str) -> Instr | None:
    body = line.strip()
    if body.startswith("ROOT "):
        body = body[5:]
    if not body.startswith("%") or " = " not in body:
        return None
    name, _, rest = body.partition(" = ")
    shape, rest = _split_type(rest)
    m = re.match(r"([\w\-\.]+)\(", rest)
    if not m:
        return None
    depth, i = 0, m.end() - 1
    for i in range(m.end() - 1, len(rest)):  # the operand list ends at its matching parenthesis
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        if depth == 0:
            break
    args = rest[m.end() : i]
    return Instr(name[1:], shape, m.group(1), re.findall(r"%([\w\-\.]+)", args), args, rest[i + 1 :])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations (name -> instructions) of an HLO module's text, and the entry's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    pending: list[str] = []  # one instruction's lines: a Mosaic kernel's config may span several

    def flush() -> None:
        if pending and current is not None:
            instr = _parse_instr(" ".join(pending))
            if instr is not None:
                comps[current].append(instr)
        pending.clear()

    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and current is None:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif current is None:
            continue
        elif line.rstrip() == "}":
            flush()
            current = None
        elif line.startswith("  ") and line.lstrip().startswith(("%", "ROOT ")):
            flush()
            pending.append(line)
        elif pending:
            pending.append(line)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def array_bytes(shape: str) -> float:
    """Bytes of an array type or a tuple of them (`(bf16[2,3], s32[])`)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape.split("{")[0] if not shape.startswith("(") else shape):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _last_array(shape: str) -> str:
    dtype, dims = _ARRAY.findall(shape)[-1]
    return f"{dtype}[{dims}]"


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _attr_ints(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def instr_flops(instr: Instr, shapes: dict[str, str]) -> float:
    """2 x output elements x contracted size, for `dot` and `convolution`; 0 for anything else."""
    out = math.prod(_dims(instr.shape))
    if instr.opcode == "dot":
        lhs = _dims(shapes.get(instr.operands[0], ""))
        dims = _attr_ints(instr.attrs, "lhs_contracting_dims")
        contracted = math.prod(lhs[d] for d in dims if d < len(lhs))
        return 2.0 * out * contracted
    if instr.opcode == "convolution":
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
        lhs = _dims(shapes.get(instr.operands[0], ""))
        rhs = _dims(shapes.get(instr.operands[1], ""))
        if not labels or len(rhs) != len(labels.group(2)) or len(lhs) != len(labels.group(1)):
            return 0.0
        lhs_size = dict(zip(labels.group(1), lhs, strict=True))
        taps = 1
        for size, label in zip(rhs, labels.group(2), strict=True):
            if label == "i":  # input features (per group): summed over for every output element
                taps *= size
            elif label.isdigit():  # a spatial window: at most as many taps as the input is long
                taps *= min(size, lhs_size.get(label, size))  # (XLA's dots as 1-long convolutions)
        return 2.0 * out * taps
    return 0.0


def group_size(attrs: str, devices: int) -> int:
    """Devices in one replica group of a collective (`{{0,1,2,3}}`, `[16,4]<=[64]` or a mesh's axes)."""
    m = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
    if m:
        return max(1, len(re.findall(r"\d+", m.group(1))))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs)
    if m:
        sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('?\w+'?)=(\d+)", m.group(1)))
        return math.prod(sizes.get(a.strip("' "), 1) for a in m.group(2).split(",") if a.strip()) or 1
    m = re.search(r"source_target_pairs=", attrs)
    return 2 if m else devices


def ring_traffic(kind: str, nbytes: float, n: int) -> float:
    """Bytes one device sends for a collective over a ring of `n` devices. `nbytes`: the all-gather's
    result, the reduce-scatter's input, the all-reduce's or all-to-all's operand, the permute's buffer."""
    if n <= 1:
        return 0.0
    share = (n - 1) / n
    return {"all-reduce": 2 * share * nbytes, "collective-permute": nbytes}.get(kind, share * nbytes)


def trip_count(cond: list[Instr], comps: dict[str, list[Instr]]) -> int | None:
    """N of a loop condition `i < N` with a constant N (in the condition or a fusion it calls)."""
    consts: dict[str, int] = {}
    todo = list(cond)
    for instr in todo:
        if instr.opcode == "constant" and re.fullmatch(r"-?\d+", instr.args.strip()):
            consts[instr.name] = int(instr.args)
        if instr.opcode == "fusion":
            called = re.search(r"calls=%([\w\-\.]+)", instr.attrs)
            if called:
                todo.extend(comps.get(called.group(1), []))
    for instr in todo:
        if instr.opcode == "compare" and "direction=LT" in instr.attrs and len(instr.operands) == 2:
            if instr.operands[1] in consts:
                return consts[instr.operands[1]]
        if instr.opcode == "compare" and "direction=GT" in instr.attrs and len(instr.operands) == 2:
            if instr.operands[0] in consts:
                return consts[instr.operands[0]]
    return None


@dataclasses.dataclass
class CallGraph:
    """How often each computation runs per execution of the entry, with loops counted (`mult`) and
    with every loop body counted once (`once`), and which computations are scheduled (their
    instructions carry the compiler's cycle estimates; fused bodies are not)."""

    mult: dict[str, float]
    once: dict[str, float]
    control: set[str]
    loops: list[tuple[str, int]]
    unknown: list[str]


def call_graph(comps: dict[str, list[Instr]], entry: str) -> CallGraph:
    edges: dict[str, list[tuple[str, float, bool]]] = {}  # caller -> (callee, runs per call, scheduled)
    loops: list[tuple[str, int]] = []
    unknown: list[str] = []
    for comp, instrs in comps.items():
        out = edges.setdefault(comp, [])
        for instr in instrs:
            if instr.opcode == "while":
                body = re.search(r"body=%([\w\-\.]+)", instr.attrs)
                cond = re.search(r"condition=%([\w\-\.]+)", instr.attrs)
                trips = trip_count(comps.get(cond.group(1), []), comps) if cond else None
                (unknown.append(instr.name) if trips is None else loops.append((instr.name, trips)))
                n = float(trips if trips is not None else 1)
                out += [(m.group(1), k, True) for m, k in ((body, n), (cond, n + 1)) if m]
                continue
            scheduled = instr.opcode in ("call", "conditional", "async-start")
            for key in ("calls", "to_apply", "branch_computations", "true_computation", "false_computation"):
                for m in re.finditer(key + r"=\{?([^,}]*(?:, ?%[\w\-\.]+)*)\}?", instr.attrs):
                    names = re.findall(r"%([\w\-\.]+)", m.group(1))
                    out += [(c, 1.0, scheduled) for c in names if c in comps]
    # Kahn's order over what the entry reaches: a computation's count is final before it is passed on
    reach, todo = {entry}, [entry]
    while todo:
        for callee, _, _ in edges.get(todo.pop(), []):
            if callee not in reach:
                reach.add(callee)
                todo.append(callee)
    indegree = dict.fromkeys(reach, 0)
    for comp in reach:
        for callee, _, _ in edges[comp]:
            indegree[callee] += 1
    mult: dict[str, float] = defaultdict(float, {entry: 1.0})
    once: dict[str, float] = defaultdict(float, {entry: 1.0})
    control, ready = {entry}, [entry]
    while ready:
        comp = ready.pop()
        for callee, n, scheduled in edges[comp]:
            mult[callee] += mult[comp] * n
            once[callee] += once[comp]
            if scheduled:
                control.add(callee)
            indegree[callee] -= 1
            if indegree[callee] == 0:
                ready.append(callee)
    return CallGraph(dict(mult), dict(once), control, loops, unknown)


def analyze(text: str, devices: int = 1) -> HloCost:
    """The cost of an optimized HLO module (`compiled.as_text()`), every loop counted by its trip count."""
    comps, entry = parse_module(text)
    shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}
    graph = call_graph(comps, entry)
    mult, once, control, loops, unknown = graph.mult, graph.once, graph.control, graph.loops, graph.unknown
    flops = flops_once = cycles = kernels = 0.0
    coll_bytes: dict[str, float] = defaultdict(float)
    traffic: dict[str, float] = defaultdict(float)
    for comp, instrs in comps.items():
        m, m1 = mult.get(comp, 0.0), once.get(comp, 0.0)
        for instr in instrs:
            f = instr_flops(instr, shapes)
            flops += m * f
            flops_once += m1 * f
            if comp in control:
                c = re.search(r'"estimated_cycles":"(\d+)"', instr.attrs)
                if c:
                    cycles += m * float(c.group(1))
            if instr.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in instr.attrs:
                kernels += m
            kind = COLLECTIVES.get(instr.opcode)
            if kind is None:
                continue
            if comp.startswith("all-reduce-scatter") and kind == "all-reduce":
                kind = "reduce-scatter"  # TPU's fused reduce-scatter: an all-reduce sliced per device
            if kind == "all-gather":  # the gathered result (of an async start: the tuple's last array)
                nbytes = array_bytes(_last_array(instr.shape))
            else:
                nbytes = array_bytes(shapes.get(instr.operands[0], instr.shape)) if instr.operands else 0.0
            coll_bytes[kind] += m * nbytes
            traffic[kind] += m * ring_traffic(kind, nbytes, group_size(instr.attrs, devices))
    return HloCost(flops, cycles, dict(coll_bytes), dict(traffic), loops, unknown, flops_once, kernels)



def breakdown(text: str, top: int = 20) -> list[tuple[float, str, str]]:
    """Where the compiler's cycles go: `(cycles with multipliers, opcode, op_name)` of the `top`
    scheduled instructions, the most expensive first (for finding what to fix in a step)."""
    comps, entry = parse_module(text)
    graph = call_graph(comps, entry)
    rows = []
    for comp in graph.control:
        for instr in comps.get(comp, []):
            c = re.search(r'"estimated_cycles":"(\d+)"', instr.attrs)
            if c:
                name = re.search(r'op_name="([^"]*)"', instr.attrs)
                cycles = graph.mult.get(comp, 0.0) * float(c.group(1))
                rows.append((cycles, instr.opcode, name.group(1) if name else ""))
    return sorted(rows, reverse=True)[:top]
