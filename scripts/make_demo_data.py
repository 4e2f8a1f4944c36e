#!/usr/bin/env python3
"""Writes data/demo/{train,eval}.jsonl: a small, deterministic chat dataset for the built-in demo
(capitals, sums, opposites; each in a fixed answer pattern a tiny model can learn). Pure stdlib.
Run: python scripts/make_demo_data.py"""
import json
import os
import random

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"),
            ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("India", "New Delhi"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Ireland", "Dublin")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("fast", "slow"), ("light", "dark"), ("early", "late"),
             ("big", "small"), ("open", "closed"), ("happy", "sad"), ("new", "old"), ("full", "empty")]


def conversations(rng):
    out = []
    for country, city in CAPITALS:
        out.append([("user", f"What is the capital of {country}?"), ("assistant", f"The capital of {country} is {city}.")])
    for a, b in OPPOSITES:
        out.append([("user", f"What is the opposite of {a}?"), ("assistant", f"The opposite of {a} is {b}.")])
    for _ in range(40):
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        out.append([("system", "You answer with the sum only."), ("user", f"{x} + {y}"), ("assistant", f"{x + y}")])
    rng.shuffle(out)
    return [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in out]


def main():
    rng = random.Random(7)
    convs = conversations(rng)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "demo")
    os.makedirs(here, exist_ok=True)
    for name, part in [("train", convs[:58]), ("eval", convs[58:])]:
        with open(os.path.join(here, f"{name}.jsonl"), "w") as f:
            for c in part:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        print(f"{name}: {len(part)} conversations")


if __name__ == "__main__":
    main()
