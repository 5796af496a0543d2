"""Generation on an LLM-dominated shape: ``generate`` vs ``fast``, and ``fast`` vs its former
full-vocabulary pass, on a random-weight language model of real width, depth and vocabulary."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class ForcedAnswer(LogitsProcessor):
    """Greedy generation writes ``token_ids`` in order, whatever the model's scores (a random
    model would rarely write [SEG]); one instance per ``generate`` call (it counts steps)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = self.token_ids[min(self.step, len(self.token_ids) - 1)]
        self.step += 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced


def forced_answer(tokenizer, text: str) -> LogitsProcessorList:
    """A fresh processor list forcing ``text`` (special tokens such as [SEG] and the end of
    turn included) as the answer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return LogitsProcessorList([ForcedAnswer(ids)])
