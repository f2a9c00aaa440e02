"""C. JSON: loads + dumps of a ~600-byte chat completion body (run pinned: taskset -c 0)."""

import json
import timeit

import msgspec
import orjson
from payloads import RESPONSE_BYTES

dec, enc = msgspec.json.Decoder(), msgspec.json.Encoder()
CANDIDATES = {
    "orjson": lambda: orjson.dumps(orjson.loads(RESPONSE_BYTES)),
    "msgspec (untyped)": lambda: enc.encode(dec.decode(RESPONSE_BYTES)),
    "stdlib json": lambda: json.dumps(json.loads(RESPONSE_BYTES)).encode(),
}

if __name__ == "__main__":
    print(f"body: {len(RESPONSE_BYTES)} bytes; loads+dumps round trip, best of 5 x 200k")
    print("| library | µs / round trip | vs stdlib |\n|---|---|---|")
    res = {k: min(timeit.repeat(f, number=200_000, repeat=5)) / 200_000 * 1e6
           for k, f in CANDIDATES.items()}
    for k, us in res.items():
        print(f"| {k} | {us:.2f} | {res['stdlib json'] / us:.1f}x |")
