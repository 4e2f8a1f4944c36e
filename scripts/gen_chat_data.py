#!/usr/bin/env python3
"""Writes N generated chat conversations (`messages` format) as JSONL and as Parquet, for
measuring data reading and tokenization at scale (scripts/compare_data_encode.sh).

usage: gen_chat_data.py N OUT_DIR        → OUT_DIR/chat-N.jsonl, OUT_DIR/chat-N.parquet

Deterministic (seed 0): each conversation has an optional system turn and 1-3 user/assistant
exchanges of 20-160 words drawn from a fixed word list with punctuation, about 1 KB of JSON per
conversation (1,000,000 → about 1 GB). The Parquet file (pyarrow, zstd, row groups of 10,000)
holds the same rows as a list<struct<role, content>> column.
"""
import json
import os
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no what "
    "model data train loss token layer weight gradient adapter quantize memory speed export file "
    "Paris river mountain number question answer because however therefore example simple value "
    "compute matrix vector python rust kernel batch sequence attention head block output input"
).split()


def sentence(rng, n):
    words = [rng.choice(WORDS) for _ in range(n)]
    words[0] = words[0].capitalize()
    out, i = [], 0
    while i < n:
        k = rng.randint(6, 14)
        out.append(" ".join(words[i : i + k]) + rng.choice([".", ".", ",", "?", "!"]))
        i += k
    return " ".join(out)


def conversation(rng):
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": sentence(rng, rng.randint(5, 20))})
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": sentence(rng, rng.randint(10, 60))})
        msgs.append({"role": "assistant", "content": sentence(rng, rng.randint(20, 100))})
    return msgs


def main():
    n, out = int(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    jsonl = os.path.join(out, f"chat-{n}.jsonl")
    parquet = os.path.join(out, f"chat-{n}.parquet")
    schema = pa.schema(
        [("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))]
    )
    writer = pq.ParquetWriter(parquet + ".tmp", schema, compression="zstd")
    with open(jsonl + ".tmp", "w") as f:
        batch = []
        for i in range(n):
            m = conversation(rng)
            f.write(json.dumps({"messages": m}) + "\n")
            batch.append(m)
            if len(batch) == 10_000 or i == n - 1:
                writer.write_table(pa.table({"messages": batch}, schema=schema))
                batch = []
    writer.close()
    os.replace(jsonl + ".tmp", jsonl)
    os.replace(parquet + ".tmp", parquet)
    print(jsonl, os.path.getsize(jsonl), parquet, os.path.getsize(parquet))


if __name__ == "__main__":
    main()
