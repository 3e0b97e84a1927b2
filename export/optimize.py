"""Optional graph rewrite: each exported attention block -> one com.microsoft MultiHeadAttention node.

ORT's transformer optimizer (`onnxruntime.transformers.optimizer`, what optimum wraps) fuses no
attention in our graphs: its patterns are those of transformers 4.x exports (three projections per
block, `Div` scaling or a mask `Add`, T5's `RelativePositionBias` chain), while our graphs come
from transformers 5 (`Mul` scaling without a mask, EVA's packed qkv projection split by `Gather`,
T5's bias and mask as two `Add`s). docs/attention-fusion.md has the node-by-node mismatch.

This module matches the attention blocks of our own exports instead, anchored on each Softmax:

    scores = MatMul(q4, k4T) [* c | / c] [+ bias_1 [+ bias_2 ...]]   (q4, v4 [B, H, S, dk]; k4T [B, H, dk, L])
    out    = Reshape(Transpose(MatMul(Softmax(scores), v4), 0 2 1 3), [B, S, -1])

  separate projections (Q-Former self/cross attention, T5 encoder):
    q4 = Transpose(Reshape(q3, [B, S, -1|H, dk]), 0 2 1 3), k4T = Transpose(Reshape(k3, ...), 0 2 3 1)
  packed projection (EVA ViT, HF Blip2Attention):
    p = Transpose(Reshape(qkv3, [B, S, 3, H, dk]), 2 0 3 1 4); q4 = p[0], k4T = Transpose(p[1], 0 1 3 2), v4 = p[2]

and replaces the block (scores to the output Reshape) with MultiHeadAttention(q3, k3, v3,
attention_bias = sum of the bias terms; num_heads, scale = c, 1/c or 1.0). The projections stay
plain MatMul/Add nodes, so INT8 quantization of them is unchanged; the packed qkv output is cut by
one Split. The summed bias must be MultiHeadAttention's [B|1, H|1, S, L] (T5: [1, H, S, S] position
bias + [B, 1, S, S] mask); ORT checks that when the session runs. Anything else (the T5 decoder's
KV-cache attention, whose query rows are grouped per request; BEATs) is left as exported and
counted as unmatched. The result is numerically the same
function: tests/test_attention_fusion.py checks it against the unfused graph and the reference.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

MS_DOMAIN = "com.microsoft"


class _Graph:
    """Producer/consumer maps and constant lookup over one GraphProto."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.refresh()

    def refresh(self):
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def parent(self, name: str, op: str | tuple[str, ...]):
        n = self.producer.get(name)
        ops = (op,) if isinstance(op, str) else op
        return n if n is not None and n.op_type in ops else None

    def const(self, name: str) -> np.ndarray | None:
        """The value of a Constant node's output or an in-file initializer, else None."""
        if name in self.inits:
            t = self.inits[name]
            return None if uses_external_data(t) else numpy_helper.to_array(t)
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def dims(self, name: str) -> list[int] | None:
        """Static dims of an initializer or a Constant (read without loading external data)."""
        if name in self.inits:
            return list(self.inits[name].dims)
        value = self.const(name)
        return None if value is None else list(value.shape)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _perm(g: _Graph, name: str, perm: list[int]):
    t = g.parent(name, "Transpose")
    return t if t is not None and list(_attr(t, "perm", [])) == perm else None


def _scalar(g: _Graph, name: str) -> float | None:
    value = g.const(name)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def _dim_of(g: _Graph, name: str, index: int) -> str | None:
    """If `name` is Unsqueeze(Gather(Shape(x), index)) (one element of x's shape), return x."""
    u = g.parent(name, "Unsqueeze")
    gather = g.parent(u.input[0], "Gather") if u is not None else None
    shape = g.parent(gather.input[0], "Shape") if gather is not None else None
    if shape is None or _scalar(g, gather.input[1]) != index or _attr(shape, "start", 0) != 0:
        return None
    return shape.input[0]


def _projection(g: _Graph, name: str) -> tuple[str, int] | None:
    """(input, output width) if `name` is MatMul(x, W) or Add(MatMul(x, W), b) with W an initializer."""
    node = g.parent(name, ("Add", "MatMul"))
    if node is not None and node.op_type == "Add":
        node = next((m for m in (g.parent(i, "MatMul") for i in node.input) if m is not None), None)
    if node is None:
        return None
    dims = g.dims(node.input[1])
    return (node.input[0], dims[-1]) if dims and len(dims) == 2 else None


def _split_heads(g: _Graph, name: str, dims: int) -> tuple[str, list, str] | None:
    """If `name` is Reshape(x3, Concat(B, S, c...)) with B, S the dims 0 and 1 of x3's projection
    input, return (x3, the constant entries c, the projection input)."""
    r = g.parent(name, "Reshape")
    if r is None:
        return None
    proj = _projection(g, r.input[0])
    concat = g.parent(r.input[1], "Concat")
    if proj is None or concat is None or len(concat.input) != dims or _attr(concat, "axis") != 0:
        return None
    source = proj[0]
    if _dim_of(g, concat.input[0], 0) is None or _dim_of(g, concat.input[1], 1) not in (source, r.input[0]):
        return None
    rest = [g.const(i) for i in concat.input[2:]]
    return r.input[0], [None if c is None or c.size != 1 else int(c.reshape(-1)[0]) for c in rest], source


def _separate(g: _Graph, q4: str, k4t: str, v4: str):
    """Separate projections: (q3, k3, v3, num_heads) or None."""
    tq, tk, tv = _perm(g, q4, [0, 2, 1, 3]), _perm(g, k4t, [0, 2, 3, 1]), _perm(g, v4, [0, 2, 1, 3])
    if tk is None:  # key.transpose(1, 2) then .transpose(2, 3), left unmerged
        inner = _perm(g, k4t, [0, 1, 3, 2])
        tk = _perm(g, inner.input[0], [0, 2, 1, 3]) if inner is not None else None
    if tq is None or tk is None or tv is None:
        return None
    parts = [_split_heads(g, t.input[0], 4) for t in (tq, tk, tv)]
    if any(p is None for p in parts):
        return None
    heads = set()
    for x3, (c_heads, c_dk), _ in parts:
        width = _projection(g, x3)[1]
        if c_heads == -1 and c_dk and c_dk > 0 and width % c_dk == 0:
            heads.add(width // c_dk)
        elif c_heads and c_heads > 0 and c_dk in (-1, width // c_heads) and width % c_heads == 0:
            heads.add(c_heads)
        else:
            return None
    if len(heads) != 1:
        return None
    return parts[0][0], parts[1][0], parts[2][0], heads.pop()


def _packed(g: _Graph, q4: str, k4t: str, v4: str):
    """EVA's packed qkv: (qkv3, num_heads) or None."""
    gq, gv = g.parent(q4, "Gather"), g.parent(v4, "Gather")
    tk = _perm(g, k4t, [0, 1, 3, 2])
    gk = g.parent(tk.input[0], "Gather") if tk is not None else None
    if gq is None or gk is None or gv is None or len({gq.input[0], gk.input[0], gv.input[0]}) != 1:
        return None
    if [_scalar(g, x.input[1]) for x in (gq, gk, gv)] != [0, 1, 2] or any(_attr(x, "axis", 0) != 0 for x in (gq, gk, gv)):
        return None
    p = _perm(g, gq.input[0], [2, 0, 3, 1, 4])
    split = _split_heads(g, p.input[0], 5) if p is not None else None
    if split is None:
        return None
    qkv3, (three, heads, _), _ = split
    width = _projection(g, qkv3)[1]
    if three != 3 or not heads or heads <= 0 or width % (3 * heads):
        return None
    return qkv3, heads


def _scores(g: _Graph, name: str):
    """Walk up from the Softmax input: (qk MatMul, scale, bias terms) or None."""
    biases = []
    node = g.producer.get(name)
    while node is not None and node.op_type == "Add":
        for chain, bias in ((0, 1), (1, 0)):
            up = g.producer.get(node.input[chain])
            if up is not None and up.op_type in ("Add", "Mul", "Div", "MatMul") and _qk_below(g, up):
                biases.append(node.input[bias])
                node = up
                break
        else:
            return None
    scale = 1.0
    if node is not None and node.op_type in ("Mul", "Div"):
        for x, c in ((0, 1), (1, 0)) if node.op_type == "Mul" else ((0, 1),):
            value = _scalar(g, node.input[c])
            if value is not None and g.parent(node.input[x], "MatMul") is not None:
                scale = value if node.op_type == "Mul" else 1.0 / value
                node = g.producer[node.input[x]]
                break
        else:
            return None
    if node is None or node.op_type != "MatMul":
        return None
    return node, scale, biases[::-1]


def _qk_below(g: _Graph, node: onnx.NodeProto) -> bool:
    """Whether the scores chain (Adds, then an optional scale, then the qk MatMul) starts at node."""
    while node is not None and node.op_type == "Add":
        node = next((p for p in (g.producer.get(i) for i in node.input)
                     if p is not None and p.op_type in ("Add", "Mul", "Div", "MatMul")), None)
    if node is not None and node.op_type in ("Mul", "Div"):
        node = next((p for p in (g.producer.get(i) for i in node.input) if p is not None and p.op_type == "MatMul"), None)
    return node is not None and node.op_type == "MatMul"


def _match(g: _Graph, softmax: onnx.NodeProto) -> dict | None:
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    users = g.consumers.get(softmax.output[0], [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
        return None
    pv = users[0]
    after = g.consumers.get(pv.output[0], [])
    if len(after) != 1 or after[0].op_type != "Transpose" or list(_attr(after[0], "perm", [])) != [0, 2, 1, 3]:
        return None
    merge = [n for n in g.consumers.get(after[0].output[0], []) if n.op_type != "Shape"]  # Shapes feed the Reshape
    if len(merge) != 1 or merge[0].op_type != "Reshape":
        return None
    out_shape = g.const(merge[0].input[1])
    concat = g.parent(merge[0].input[1], "Concat")
    if out_shape is not None:
        ok = out_shape.size == 3 and out_shape[-1] == -1
    else:
        last = g.const(concat.input[-1]) if concat is not None else None
        ok = concat is not None and len(concat.input) == 3 and last is not None and last.size == 1 and last.item() == -1
    if not ok:
        return None
    scores = _scores(g, softmax.input[0])
    if scores is None:
        return None
    qk, scale, biases = scores
    q4, k4t, v4 = qk.input[0], qk.input[1], pv.input[1]
    if (sep := _separate(g, q4, k4t, v4)) is not None:
        q3, k3, v3, heads = sep
        return dict(kind="separate", q=q3, k=k3, v=v3, heads=heads, scale=scale, biases=biases, out=merge[0])
    if (packed := _packed(g, q4, k4t, v4)) is not None:
        qkv3, heads = packed
        return dict(kind="packed", qkv=qkv3, heads=heads, scale=scale, biases=biases, out=merge[0])
    return None


def _reads(nodes) -> set[str]:
    """Every tensor name the nodes read, subgraphs (If/Loop bodies) included."""
    names = set()
    for n in nodes:
        names.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _reads(sub.node) | {o.name for o in sub.output}
    return names


def _prune(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads, then initializers nobody reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | _reads(graph.node)
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = outputs | _reads(graph.node)
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def fuse_attention(model: onnx.ModelProto) -> dict:
    """Rewrite `model` in place; returns {"softmax": found, "fused": n, "unmatched": n, "kinds": {...}}."""
    graph = model.graph
    g = _Graph(graph)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    kinds: Counter = Counter()
    for index, softmax in enumerate(softmaxes):
        m = _match(g, softmax)
        if m is None:
            continue
        out = m["out"]
        tag = f"{out.name or 'attention'}_fused{index}"
        new = []
        if m["kind"] == "packed":
            q, k, v = (f"{tag}/{x}" for x in "qkv")
            new.append(helper.make_node("Split", [m["qkv"]], [q, k, v], name=f"{tag}/Split", axis=-1))
        else:
            q, k, v = m["q"], m["k"], m["v"]
        bias = ""
        if m["biases"]:
            bias = m["biases"][0]
            for i, term in enumerate(m["biases"][1:]):
                total = f"{tag}/attention_bias_{i}"
                new.append(helper.make_node("Add", [bias, term], [total], name=f"{tag}/AttentionBias_{i}"))
                bias = total
        inputs = [q, k, v] + (["", "", bias] if bias else [])
        new.append(helper.make_node("MultiHeadAttention", inputs, [out.output[0]], name=f"{tag}/MultiHeadAttention",
                                    domain=MS_DOMAIN, num_heads=int(m["heads"]), scale=float(m["scale"])))
        position = list(graph.node).index(out)
        graph.node.remove(out)
        for offset, node in enumerate(new):
            graph.node.insert(position + offset, node)
        kinds[m["kind"]] += 1
        g.refresh()
    if kinds:
        _prune(graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    fused = sum(kinds.values())
    return {"softmax": len(softmaxes), "fused": fused, "unmatched": len(softmaxes) - fused, "kinds": dict(kinds)}


def optimize_attention(src: str | Path, dest: str | Path | None = None) -> dict:
    """Fuse the attention blocks of the graph at `src` and write it to `dest` (default: in place).

    A graph whose weights lie in an external file keeps pointing at that file, so `dest` must then
    be in the same directory. Returns fuse_attention's counts.
    """
    src = Path(src)
    dest = Path(dest) if dest is not None else src
    model = onnx.load(str(src), load_external_data=False)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external and dest.resolve().parent != src.resolve().parent:
        raise ValueError(f"{src}: weights in an external file: write the fused graph beside it, not to {dest}")
    counts = fuse_attention(model)
    tmp = dest.with_name(f".{dest.name}.fused.tmp")
    onnx.save(model, str(tmp))
    try:
        onnx.checker.check_model(str(tmp))
    except Exception:
        tmp.unlink()
        raise
    tmp.replace(dest)
    return counts


def main(argv: list[str] | None = None) -> None:
    """`python -m export.optimize GRAPH [--out FUSED]`: fuse one graph, print the counts."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("graph", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write the fused graph (default: in place)")
    args = parser.parse_args(argv)
    print(json.dumps(optimize_attention(args.graph, args.out)))


if __name__ == "__main__":
    main()
