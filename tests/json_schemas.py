"""Random JSON schemas for structured-output tests: sized so that a random model's answer under
them ends within a small budget."""
from __future__ import annotations

import random

WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Objects (required keys, no others), arrays, enums, bounded integers and numbers, strings
    with patterns or lengths, booleans: sized so that a random model finishes within the budget."""
    kinds = ["integer", "number", "enum", "pattern", "short", "boolean", "array"] + (["object"] * 3 if depth < 1 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 100]), "multipleOf": 0.5}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{1,6}$", "^[0-9]{3}-[0-9]{2}$", "^(ab|cd)+x?$"]),
                "maxLength": 12}
    if kind == "short":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(1, 6)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": 0, "maxItems": rng.randint(1, 3)}
    keys = rng.sample(["name", "id", "tags", "score", "ok", "kind", "info"], rng.randint(1, 3))
    return {"type": "object", "properties": {k: random_schema(rng, depth + 1) for k in keys},
            "required": rng.sample(keys, rng.randint(1, len(keys))), "additionalProperties": False}
