"""Writes demo_qa.jsonl, the evaluation set of the lm-eval tasks beside it, from the demo model's
corpus: every sixth question with an answer of its own, each with that answer and three others
as choices (the right one at a place that moves from question to question).

    python -m demo.eval.make_data        # rewrites demo/eval/demo_qa.jsonl, byte for byte the same
"""
from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "corpus.txt"


def questions() -> list[dict]:
    pairs = re.findall(r"^Q: (.*)\nA: (.*)$", CORPUS.read_text(), re.M)
    first: dict[str, str] = {}  # answer -> its first question
    for q, a in pairs:
        first.setdefault(a, q)
    answers = list(first)
    docs = []
    for k in range(0, len(answers), 6):
        others = [answers[(k + 7 * j) % len(answers)] for j in (1, 2, 3)]  # 7 and 147 share no factor
        label = len(docs) % 4
        choices = others[:label] + [answers[k]] + others[label:]
        docs.append({"question": first[answers[k]], "answer": answers[k], "choices": choices, "label": label})
    return docs


if __name__ == "__main__":
    with open(HERE / "demo_qa.jsonl", "w") as f:
        for doc in questions():
            f.write(json.dumps(doc) + "\n")
