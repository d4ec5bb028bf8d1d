"""How often sampled answers are right under different default settings, through POST /.

    .venv/bin/python bench/sampling_defaults.py          # starts its own server

Eight factual questions with one unambiguous answer each, 10 sampled answers
per question and setting (96 tokens at most), all ten sent at once. The
settings are sent explicitly, so the server's own defaults do not matter;
the last row is a bare request, i.e. what the server's defaults give. This
is how the embedded model's entry in engine/generation_defaults.py was chosen.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import running_server  # noqa: E402

QUESTIONS = [
    ("What is the capital of France?", ("paris",)), ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Germany?", ("berlin",)), ("How many days are in a week?", ("7", "seven")),
    ("What is the boiling point of water in Celsius?", ("100",)), ("What color is the sky on a clear day?", ("blue",)),
    ("What is 2 + 2?", ("4", "four")), ("What language is spoken in Spain?", ("spanish",)),
]
SETTINGS = [
    {"temperature": 0.95, "top_p": 0.8, "top_k": 30},  # the EAS protocol's defaults
    {"temperature": 0.2, "top_p": 0.9},  # the model card's recommendation
    {"temperature": 0.2, "top_p": 0.5},
    {"temperature": 0.3, "top_p": 0.5},
    {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1},
    {"temperature": 0},
    {},  # the server's defaults
]


async def score(url: str, setting: dict) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        per_question = []
        for question, answers in QUESTIONS:
            replies = await asyncio.gather(*[client.post("/", json={"prompt": question, "max_new_tokens": 96, **setting})
                                             for _ in range(10)])
            per_question.append(sum(any(a in r.json()["response"].lower() for a in answers) for r in replies))
    return {"setting": setting or "server defaults", "right": f"{sum(per_question)}/80", "per_question": per_question}


def main() -> None:
    with running_server([]) as url:
        for setting in SETTINGS:
            print(json.dumps(asyncio.run(score(url, setting))), flush=True)


if __name__ == "__main__":
    main()
