"""Differential check of gpt.read_safetensors against the reference `safetensors` library (not a test; not collected).

    python3 -m venv /tmp/st && /tmp/st/bin/pip install safetensors      # a scratch environment, not a dependency
    .venv/bin/python tests/differential_safetensors.py /tmp/st/bin/python [N]

Writes N mutated files (default 3000), asks both readers which they accept, and prints every file where they
disagree, except for dtypes gpt.py deliberately omits (the F8/F4/U16/U32/U64 families). The one other difference
it finds is deliberate too: a dimension of 2**63 or more in an empty tensor, which torch's int64 sizes cannot hold."""
import json, random, struct, subprocess, sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpt  # noqa: E402

OMITTED = ("F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "F4", "F6_E2M3", "F6_E3M2", "E8M0", "F8_E8M0", "C64")
REFERENCE = """import sys
from safetensors import deserialize
for path in sys.argv[1:]:
    try:
        deserialize(open(path, "rb").read())
        print(1)
    except Exception:
        print(0)
"""
ODD = [0, 1, -1, 2.0, 4.5, True, None, "3", [], {}, 2**63, 2**64, 10**30, float("inf")]


def valid_header():
    return {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "I64", "shape": [1], "data_offsets": [24, 32]},
            "c": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [32, 32]}}


def mutate(header, rng):
    name = rng.choice(["a", "b", "c"])
    kind = rng.randrange(12)
    info = header.get(name)
    if not isinstance(info, dict):
        info = None
    if kind == 0 and info:
        info["shape"] = [rng.choice(ODD) if rng.random() < 0.5 else d for d in info.get("shape") or []] or [rng.choice(ODD)]
    elif kind == 1 and info:
        info["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "f32", "", ["F32"], 1, None,
                                    "F8_E4M3", "U32", "I32", "I16"])
    elif kind == 2 and info:
        info["data_offsets"] = rng.choice([[0], [0, 24, 1], ["0", "24"], [24, 0], [-1, 23], [0, 24.0], None,
                                           [rng.randrange(40), rng.randrange(40)]])
    elif kind == 3:
        header["__metadata__"] = rng.choice([None, [], {"a": 1}, {"a": None}, {"a": "b"}, "x", {}])
    elif kind == 4 and info:
        del info[rng.choice(list(info))]
    elif kind == 5 and info:
        info["extra"] = rng.choice(ODD)
    elif kind == 6:
        header.pop(name, None)
    elif kind == 7:
        header[name] = rng.choice(ODD)
    elif kind == 8:
        header.pop("__metadata__", None)
    elif kind == 9 and info:
        info["shape"] = list(reversed(info.get("shape") or [])) + rng.choice([[], [1], [2]])
    return header


def encode(header, rng):
    text = json.dumps(header, allow_nan=True).encode()
    mode = rng.randrange(8)
    if mode == 0:
        text = b" " + text
    elif mode == 1:
        text += b" " * rng.randrange(1, 9)
    elif mode == 2:
        text = text.replace(b'"a"', b'"\xff"', 1)
    data = bytes(32)
    n = len(text)
    size_mode = rng.randrange(10)
    if size_mode == 0:
        data = data[:rng.randrange(32)]
    elif size_mode == 1:
        data += bytes(rng.randrange(1, 9))
    elif size_mode == 2:
        n += rng.choice([-1, 1, 8])
    return struct.pack("<Q", max(n, 0)) + text + data


def ours(paths):
    accepted = []
    for path in paths:
        try:
            gpt.read_safetensors(path)
            accepted.append(1)
        except ValueError:
            accepted.append(0)
    return accepted


def main(reference_python, count=3000):
    rng = random.Random(0)
    folder = Path(tempfile.mkdtemp())
    paths = []
    for i in range(count):
        header = valid_header()
        for _ in range(rng.randrange(4)):
            header = mutate(header, rng)
        path = folder / f"{i}.safetensors"
        path.write_bytes(encode(header, rng))
        paths.append(str(path))
    theirs = subprocess.run([reference_python, "-c", REFERENCE, *paths], capture_output=True, text=True, check=True)
    reference = [int(x) for x in theirs.stdout.split()]
    mine = ours(paths)
    disagree = []
    for path, a, b in zip(paths, mine, reference):
        head = Path(path).read_bytes()[8:]
        if a != b and not any(d.encode() in head for d in OMITTED):
            disagree.append((path, a, b, head))
    print(f"{count} files: gpt.py accepts {sum(mine)}, safetensors accepts {sum(reference)}; "
          f"{len(disagree)} disagreements outside omitted dtypes")
    for path, a, b, head in disagree[:20]:
        print(f"  gpt.py {'accepts' if a else 'rejects'}, safetensors {'accepts' if b else 'rejects'}: {head!r}")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
