#!/usr/bin/env python3
"""Reference encoder/decoder for hv IPC v1, driven only by ipc-schema/messages.json.

Reads ipc-schema/vector-inputs.json (message values written by hand) and writes
ipc-schema/vectors.json (the values, normalised, with the expected bytes as hex).

Nothing about hv's Swift implementation is known here: every layout, enum, bitset, limit and
validation rule comes from messages.json, so this file doubles as an executable reading of the
schema. A plugin author can use it to check an encoder in another language.

    python3 ipc-schema/tools/vectors.py           # regenerate vectors.json
    python3 ipc-schema/tools/vectors.py --check   # exit 1 if vectors.json is stale or wrong
    python3 ipc-schema/tools/vectors.py --decode LAYOUT HEX   # decode bytes, print fields

Value conventions (inputs and outputs):
- integers are JSON numbers or "0x..." strings; outputs write every u64 as a "0x..." string
  (JSON numbers lose precision above 2**53 in many parsers) and other integers as numbers;
- enum fields take the enum's member name (or a raw integer, to build invalid input);
- bitset fields take a list of bit names (or a raw integer);
- bytes fields take a hex string, utf8 fields a string;
- count_of / length_of / reserved / fixed fields are computed unless given explicitly (giving
  them explicitly is how the "must reject" inputs are built).
"""

import argparse
import ast
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_DIR = os.path.dirname(HERE)
SCHEMA_PATH = os.path.join(SCHEMA_DIR, "messages.json")
INPUTS_PATH = os.path.join(SCHEMA_DIR, "vector-inputs.json")
VECTORS_PATH = os.path.join(SCHEMA_DIR, "vectors.json")

INT_TYPES = ("u8", "u16", "u32", "i32", "u64")


class SchemaError(Exception):
    """messages.json or vector-inputs.json is inconsistent."""


class DecodeError(Exception):
    """Input bytes break a rule of the schema; `category` is a key of error_categories."""

    def __init__(self, category, detail):
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail


def parse_int(v):
    if isinstance(v, bool):
        raise SchemaError(f"boolean where an integer was expected: {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return int(v, 0)
    raise SchemaError(f"not an integer: {v!r}")


def eval_expr(expr, names):
    """Evaluates a schema expression: + - * comparisons, integer literals and names."""
    tree = ast.parse(expr, mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise SchemaError(f"unknown name {node.id!r} in {expr!r}")
            return names[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            a, b = ev(node.left), ev(node.comparators[0])
            op = node.ops[0]
            table = {ast.GtE: a >= b, ast.LtE: a <= b, ast.Gt: a > b, ast.Lt: a < b, ast.Eq: a == b, ast.NotEq: a != b}
            for k, result in table.items():
                if isinstance(op, k):
                    return result
        raise SchemaError(f"unsupported expression {expr!r}")

    return ev(tree)


class Codec:
    def __init__(self, schema):
        self.schema = schema
        self.types = schema["types"]
        self.enums = schema["enums"]
        self.bitsets = schema["bitsets"]
        self.layouts = schema["layouts"]
        self.categories = schema["error_categories"]

    # -- scalar helpers -------------------------------------------------------------------

    def int_size(self, t):
        return self.types[t]["size"]

    def int_range(self, t):
        bits = 8 * self.int_size(t)
        if self.types[t]["signed"]:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1

    def to_int(self, field, v):
        if "enum" in field and isinstance(v, str) and not v.startswith(("0x", "-")) and not v.isdigit():
            values = self.enums[field["enum"]]["values"]
            if v not in values:
                raise SchemaError(f"{field['name']}: {v!r} is not in enum {field['enum']}")
            return values[v]
        if "bitset" in field and isinstance(v, list):
            bits = self.bitsets[field["bitset"]]["bits"]
            n = 0
            for item in v:
                if isinstance(item, str) and item in bits:
                    n |= 1 << bits[item]
                else:
                    n |= parse_int(item)
            return n
        return parse_int(v)

    def from_int(self, field, n):
        """The normalised JSON form of a decoded integer field."""
        if "enum" in field:
            for name, value in self.enums[field["enum"]]["values"].items():
                if value == n:
                    return name
            return n
        if "bitset" in field:
            bits = self.bitsets[field["bitset"]]["bits"]
            names = [name for name, bit in sorted(bits.items(), key=lambda kv: kv[1]) if n & (1 << bit)]
            rest = n & ~sum(1 << b for b in bits.values())
            return names + ([f"0x{rest:x}"] if rest else [])
        if field["type"] == "u64":
            return f"0x{n:x}"
        return n

    def pack(self, t, n, what):
        lo, hi = self.int_range(t)
        if not lo <= n <= hi:
            raise SchemaError(f"{what}: {n} does not fit {t}")
        return n.to_bytes(self.int_size(t), "little", signed=self.types[t]["signed"])

    # -- encoding -------------------------------------------------------------------------

    def field(self, layout_name, name):
        for f in self.layouts[layout_name]["fields"]:
            if f["name"] == name:
                return f
        raise SchemaError(f"{layout_name} has no field {name!r}")

    def encode_variable(self, layout_name, f, values):
        """Bytes of a bytes/utf8/array field."""
        v = values.get(f["name"])
        if v is None:
            raise SchemaError(f"{layout_name}.{f['name']} is missing")
        if f["type"] == "bytes":
            return bytes.fromhex(v)
        if f["type"] == "utf8":
            return v.encode("utf-8")
        if f["type"] == "array":
            return b"".join(self.encode(f["of"], item) for item in v)
        raise SchemaError(f"{f['type']} is not variable-length")

    def encode(self, layout_name, values):
        layout = self.layouts[layout_name]
        known = {f["name"] for f in layout["fields"]}
        for k in values:
            if k not in known:
                raise SchemaError(f"{layout_name} has no field {k!r}")
        out = bytearray()
        for f in layout["fields"]:
            if "offset" in f:
                if len(out) < f["offset"] and layout.get("gaps") == "zero":
                    out += bytes(f["offset"] - len(out))
                if len(out) != f["offset"]:
                    raise SchemaError(f"{layout_name}.{f['name']}: declared offset {f['offset']}, actual {len(out)}")
            t = f["type"]
            if t in INT_TYPES:
                if f["name"] in values:
                    n = self.to_int(f, values[f["name"]])
                elif "count_of" in f:
                    n = len(values.get(f["count_of"], []))
                elif "length_of" in f:
                    n = len(self.encode_variable(layout_name, self.field(layout_name, f["length_of"]), values))
                elif f.get("reserved"):
                    n = f["value"]
                elif "fixed" in f:
                    n = f["fixed"]
                else:
                    raise SchemaError(f"{layout_name}.{f['name']} is missing")
                out += self.pack(t, n, f"{layout_name}.{f['name']}")
            else:
                out += self.encode_variable(layout_name, f, values)
        if "size" in layout:
            if len(out) < layout["size"] and layout.get("gaps") == "zero":
                out += bytes(layout["size"] - len(out))
            if len(out) != layout["size"]:
                raise SchemaError(f"{layout_name}: declared size {layout['size']}, encoded {len(out)}")
        if "max_size" in layout and len(out) > layout["max_size"]:
            raise SchemaError(f"{layout_name}: {len(out)} bytes exceed max_size {layout['max_size']}")
        return bytes(out)

    # -- decoding -------------------------------------------------------------------------

    def decode(self, layout_name, data, pos=0, top=True):
        """Returns (normalised values, end position). Raises DecodeError."""
        layout = self.layouts[layout_name]
        category = layout.get("error_category")
        start = pos
        values = {}
        raw = {}

        def need(count, what):
            if count < 0 or pos + count > len(data):
                raise DecodeError("truncated", f"{layout_name}.{what}: needs {count} bytes at {pos}, {len(data) - pos} left")

        for f in layout["fields"]:
            name = f["name"]
            if "offset" in f and layout.get("gaps") == "zero":
                pos = start + f["offset"]
            t = f["type"]
            if t in INT_TYPES:
                size = self.int_size(t)
                need(size, name)
                n = int.from_bytes(data[pos:pos + size], "little", signed=self.types[t]["signed"])
                pos += size
                where = f"{layout_name}.{name} = {n}"
                if f.get("reserved") and n != f["value"]:
                    raise DecodeError("reserved_nonzero", where)
                if "fixed" in f and n != f["fixed"]:
                    raise DecodeError(category or "invalid_value", f"{where}, must be {f['fixed']}")
                if "enum" in f and f.get("unknown") != "accept" and n not in self.enums[f["enum"]]["values"].values():
                    raise DecodeError(category or "unknown_enum", where)
                if "bitset" in f:
                    bs = self.bitsets[f["bitset"]]
                    mask = sum(1 << b for b in bs["bits"].values())
                    if bs["unknown_bits"] == "reject" and n & ~mask:
                        raise DecodeError(category or "reserved_bits", f"{where}: reserved bits 0x{n & ~mask:x}")
                    for group in bs.get("exclusive", []):
                        if sum(1 for b in group if n & (1 << bs["bits"][b])) > 1:
                            raise DecodeError(category or "invalid_flags", f"{where}: {' and '.join(group)} together")
                if "max" in f and n > f["max"]:
                    raise DecodeError(category or "limit_exceeded", f"{where} > {f['max']}")
                if f.get("power_of_two") and (n == 0 or n & (n - 1)):
                    raise DecodeError(category or "invalid_value", f"{where} is not a power of two")
                if f.get("nonzero") and n == 0:
                    raise DecodeError(category or "invalid_value", f"{where} must not be zero")
                if f.get("equals_remaining") and n != len(data) - pos:
                    raise DecodeError("length_mismatch", f"{where}, {len(data) - pos} bytes follow")
                raw[name] = n
                values[name] = self.from_int(f, n)
            elif t in ("bytes", "utf8"):
                length = raw[f["length"]]
                need(length, name)
                chunk = data[pos:pos + length]
                pos += length
                values[name] = chunk.hex() if t == "bytes" else chunk.decode("utf-8", errors="replace")
            elif t == "array":
                items = []
                for _ in range(raw[f["count"]]):
                    item, pos = self.decode(f["of"], data, pos, top=False)
                    items.append(item)
                values[name] = items
            else:
                raise SchemaError(f"unknown type {t}")
        for check in layout.get("checks", []):
            (kind, operands), = check.items()
            if kind == "sum_fits_u64":
                total = sum(raw[o] for o in operands)
                if total >= 1 << 64:
                    raise DecodeError(category or "invalid_value", f"{layout_name}: {' + '.join(operands)} overflows u64")
            else:
                raise SchemaError(f"unknown check {kind}")
        if "size" in layout and layout.get("gaps") == "zero":
            if len(data) - start < layout["size"]:
                raise DecodeError("truncated", f"{layout_name} needs {layout['size']} bytes")
            pos = start + layout["size"]
        if top and pos != len(data):
            raise DecodeError("trailing_bytes", f"{layout_name}: {len(data) - pos} bytes after the last field")
        return values, pos

    def ring_attach_check(self, header_values, region_size):
        """The attach rules of the 'ring' section, given a decoded header and the region size."""
        ring = self.schema["ring"]
        names = {k: v for k, v in ring.items() if isinstance(v, int)}
        for k, v in header_values.items():
            names[k] = parse_int(v) if not isinstance(v, list) else v
        names["region_size"] = region_size
        for rule in ring["attach_checks"]:
            if not eval_expr(rule, names):
                raise DecodeError("bad_header", f"region of {region_size} bytes breaks {rule!r}")


# -- schema self-checks ----------------------------------------------------------------------

def lint(schema):
    """Internal consistency of messages.json; raises SchemaError."""
    codec = Codec(schema)
    for name, e in schema["enums"].items():
        if e["type"] not in INT_TYPES:
            raise SchemaError(f"enum {name}: bad type")
        lo, hi = codec.int_range(e["type"])
        vals = list(e["values"].values())
        if len(set(vals)) != len(vals) or not all(lo <= v <= hi for v in vals):
            raise SchemaError(f"enum {name}: duplicate or out-of-range values")
    for name, b in schema["bitsets"].items():
        bits = list(b["bits"].values())
        if len(set(bits)) != len(bits) or not all(0 <= x < 8 * codec.int_size(b["type"]) for x in bits):
            raise SchemaError(f"bitset {name}: bad bits")
    for lname, layout in schema["layouts"].items():
        seen = set()
        for f in layout["fields"]:
            if f["type"] not in schema["types"]:
                raise SchemaError(f"{lname}.{f['name']}: unknown type")
            for ref in ("enum", "bitset"):
                if ref in f and f[ref] not in schema[ref + "s"]:
                    raise SchemaError(f"{lname}.{f['name']}: unknown {ref}")
                if ref in f and schema[ref + "s"][f[ref]]["type"] != f["type"]:
                    raise SchemaError(f"{lname}.{f['name']}: type differs from its {ref}")
            if f["type"] == "array" and f["of"] not in schema["layouts"]:
                raise SchemaError(f"{lname}.{f['name']}: unknown layout {f['of']}")
            for ref in ("length", "count"):
                if ref in f and f[ref] not in seen:
                    raise SchemaError(f"{lname}.{f['name']}: {ref} field must come earlier")
            seen.add(f["name"])
    # Fixed layouts: encoding zero values must give exactly the declared offsets and size.
    for lname, layout in schema["layouts"].items():
        if all(f["type"] in INT_TYPES for f in layout["fields"]):
            zeros = {f["name"]: 0 for f in layout["fields"] if not f.get("reserved") and "fixed" not in f
                     and "count_of" not in f and "length_of" not in f}
            codec.encode(lname, zeros)
    c = schema["constants"]
    frame = schema["layouts"]["frame"]
    if codec.field("frame", "payload")["offset"] != c["frame_header_size"]:
        raise SchemaError("frame payload offset != frame_header_size")
    if frame["max_size"] != c["frame_maximum_size"] or c["frame_maximum_payload"] != c["frame_maximum_size"] - c["frame_header_size"]:
        raise SchemaError("frame size constants disagree")
    ring = schema["ring"]
    header = schema["layouts"][ring["header"]]
    if header["size"] != ring["header_size"]:
        raise SchemaError("ring header size")
    for fname, off in ring["offsets"].items():
        if codec.field(ring["header"], fname)["offset"] != off:
            raise SchemaError(f"ring offset {fname} disagrees with the header layout")
    if codec.field(ring["header"], "magic")["fixed"] != ring["magic"] or \
            ring["magic"].to_bytes(4, "little").decode("ascii") != ring["magic_ascii"]:
        raise SchemaError("ring magic")
    if codec.field(ring["header"], "version")["fixed"] != ring["version"]:
        raise SchemaError("ring version")
    for side in ("request", "response"):
        entry = schema["layouts"][ring[f"{side}_entry"]]
        if entry["size"] != ring[f"{side}_entry_size"] or codec.field(ring["header"], f"{side}_entry_size")["fixed"] != entry["size"]:
            raise SchemaError(f"{side} entry size")
    atomics = [f for f in header["fields"] if f.get("atomic")]
    lines = {f["offset"] // ring["cache_line_size"] for f in atomics}
    if len(lines) != len(atomics) or 0 in lines:
        raise SchemaError("each ring index/flag must own a cache line, apart from the static fields")
    for mname, m in schema["messages"].items():
        if m["type"] not in schema["enums"]["message_type"]["values"]:
            raise SchemaError(f"message {mname}: unknown type")
        for part in ("request", "reply", "reply_on_error"):
            if part in m and m[part] not in schema["layouts"]:
                raise SchemaError(f"message {mname}: unknown {part} layout")
        if m.get("capability") and m["capability"] not in schema["bitsets"]["capabilities"]["bits"]:
            raise SchemaError(f"message {mname}: unknown capability")
        for s in m["statuses"]:
            if s not in schema["enums"]["status"]["values"]:
                raise SchemaError(f"message {mname}: unknown status {s}")
    if set(schema["messages"]) != set(schema["enums"]["message_type"]["values"]):
        raise SchemaError("every message type needs a 'messages' entry and vice versa")


# -- vectors ---------------------------------------------------------------------------------

def merge(base, override):
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def normalised_equal(codec, layout_name, given, decoded):
    """Every value given in the input must read back identically after normalisation."""
    layout = codec.layouts[layout_name]
    for f in layout["fields"]:
        if f["name"] not in given:
            continue
        g, d = given[f["name"]], decoded[f["name"]]
        if f["type"] == "array":
            if len(g) != len(d) or not all(normalised_equal(codec, f["of"], gi, di) for gi, di in zip(g, d)):
                return False
        elif f["type"] in INT_TYPES:
            if codec.to_int(f, g) != codec.to_int(f, d):
                return False
        elif f["type"] == "bytes":
            if g.lower() != d:
                return False
        elif g != d:
            return False
    return True


def build_frame(schema, codec, spec, payload):
    frame = dict(spec.get("frame", {}))
    if "type" not in frame:
        if not spec.get("message"):
            raise SchemaError(f"{spec['name']}: a frame needs a message or an explicit type")
        frame["type"] = schema["messages"][spec["message"]]["type"]
    frame.setdefault("flags", [])
    frame.setdefault("status", "OK")
    frame["payload"] = payload.hex()
    return frame


def check_message_layout(schema, spec):
    m = spec.get("message")
    if not m:
        return
    if m not in schema["messages"]:
        raise SchemaError(f"{spec['name']}: unknown message {m}")
    allowed = {schema["messages"][m][p] for p in ("request", "reply", "reply_on_error") if p in schema["messages"][m]}
    allowed.add("empty")
    if spec["layout"] not in allowed:
        raise SchemaError(f"{spec['name']}: layout {spec['layout']} is not used by {m}")


def ring_region_size(schema, given, fields):
    """The memfd size for a ring-header vector: as given, else what the capacities need."""
    if given is not None:
        return parse_int(given)
    names = {k: v for k, v in schema["ring"].items() if isinstance(v, int)}
    for k in ("request_capacity", "response_capacity"):
        names[k] = parse_int(fields[k])
    return eval_expr(schema["ring"]["region_size"], names)


def generate(schema, inputs):
    codec = Codec(schema)
    lint(schema)
    by_name = {}
    out_vectors = []
    for spec in inputs["vectors"]:
        name = spec["name"]
        if name in by_name:
            raise SchemaError(f"duplicate vector name {name}")
        by_name[name] = spec
        check_message_layout(schema, spec)
        layout = spec["layout"]
        payload = codec.encode(layout, spec["fields"])
        decoded, _ = codec.decode(layout, payload)
        if not normalised_equal(codec, layout, spec["fields"], decoded):
            raise SchemaError(f"{name}: fields do not round-trip")
        vec = {"name": name, "doc": spec.get("doc", ""), "layout": layout}
        if spec.get("message"):
            vec["message"] = spec["message"]
        vec["fields"] = decoded
        vec["hex"] = payload.hex()
        if layout == schema["ring"]["header"]:
            region = ring_region_size(schema, spec.get("region_size"), spec["fields"])
            codec.ring_attach_check(decoded, region)
            vec["region_size"] = region
        if "frame" in spec:
            frame_values = build_frame(schema, codec, spec, payload)
            frame_bytes = codec.encode("frame", frame_values)
            frame_decoded, _ = codec.decode("frame", frame_bytes)
            if not normalised_equal(codec, "frame", frame_values, frame_decoded):
                raise SchemaError(f"{name}: frame does not round-trip")
            vec["frame"] = {k: v for k, v in frame_decoded.items() if k != "payload"}
            vec["frame_hex"] = frame_bytes.hex()
        out_vectors.append(vec)

    out_reject = []
    names = set(by_name)
    for spec in inputs["reject"]:
        name = spec["name"]
        if name in names:
            raise SchemaError(f"duplicate vector name {name}")
        names.add(name)
        base = copy.deepcopy(by_name[spec["base"]]) if "base" in spec else {"name": name}
        base["name"] = name
        for key in ("message", "layout", "region_size"):
            if key in spec:
                base[key] = spec[key]
        base["fields"] = merge(base.get("fields", {}), spec.get("fields", {}))
        target = spec.get("target", "payload")
        payload = codec.encode(base["layout"], base["fields"])
        if target == "frame":
            if "frame" in spec or "frame" in base:
                base["frame"] = merge(base.get("frame", {}), spec.get("frame", {}))
            data = codec.encode("frame", build_frame(schema, codec, base, payload))
            layout = "frame"
        else:
            data = payload
            layout = base["layout"]
        if "truncate" in spec:
            data = data[:len(data) - spec["truncate"]]
        if "append_hex" in spec:
            data += bytes.fromhex(spec["append_hex"])
        is_ring_header = layout == schema["ring"]["header"]
        region = ring_region_size(schema, spec.get("region_size", base.get("region_size")), base["fields"]) if is_ring_header else None
        try:
            decoded, _ = codec.decode(layout, data)
            if is_ring_header:
                codec.ring_attach_check(decoded, region)
        except DecodeError as e:
            if e.category != spec["error"]:
                raise SchemaError(f"{name}: expected {spec['error']}, the reference decoder says {e}")
            if e.category not in codec.categories:
                raise SchemaError(f"{name}: unknown category {e.category}")
            vec = {"name": name, "doc": spec.get("doc", ""), "layout": layout, "hex": data.hex(),
                   "error": e.category, "detail": e.detail}
            if is_ring_header:
                vec["region_size"] = region
            out_reject.append(vec)
            continue
        raise SchemaError(f"{name}: the reference decoder accepts it, expected {spec['error']}")

    return {
        "about": "Generated by ipc-schema/tools/vectors.py from vector-inputs.json and messages.json. Do not edit.",
        "protocol": {"major": schema["protocol"]["major"], "minor": schema["protocol"]["minor"]},
        "vectors": out_vectors,
        "reject": out_reject,
    }


def render(doc):
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if vectors.json differs from a fresh generation")
    ap.add_argument("--decode", nargs=2, metavar=("LAYOUT", "HEX"), help="decode HEX as LAYOUT and print the fields")
    args = ap.parse_args(argv)
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        schema = json.load(fh)
    if args.decode:
        codec = Codec(schema)
        try:
            values, _ = codec.decode(args.decode[0], bytes.fromhex(args.decode[1]))
        except DecodeError as e:
            print(f"rejected: {e}")
            return 1
        print(json.dumps(values, indent=2, ensure_ascii=False))
        return 0
    with open(INPUTS_PATH, encoding="utf-8") as fh:
        inputs = json.load(fh)
    try:
        text = render(generate(schema, inputs))
    except SchemaError as e:
        print(f"vectors.py: {e}", file=sys.stderr)
        return 2
    if args.check:
        try:
            with open(VECTORS_PATH, encoding="utf-8") as fh:
                current = fh.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print("vectors.py: ipc-schema/vectors.json is stale; run python3 ipc-schema/tools/vectors.py", file=sys.stderr)
            return 1
        doc = json.loads(text)
        print(f"vectors.py: vectors.json is up to date ({len(doc['vectors'])} vectors, {len(doc['reject'])} must-reject)")
        return 0
    with open(VECTORS_PATH, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"vectors.py: wrote {os.path.relpath(VECTORS_PATH)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
