"""Generation on an LLM-dominated shape: ``generate`` vs ``fast``, and ``fast`` vs its former
full-vocabulary pass, on a random-weight language model of real width, depth and vocabulary."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from transformers import LogitsProcessor, LogitsProcessorList

from sa2va.benchmarks.harness import (
    Bench,
    Results,
    Row,
    compose_config,
    interleave,
    max_diff,
    per_item,
)
from sa2va.data.datamodule import load_rgb
from sa2va.model.sa2va import Sa2VA


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


def llm_shape_model(bench: Bench, layers: int) -> DictConfig:
    """The composed (tiny) model with the LLM of ``conf/model/<shape>.yaml`` cut to
    ``layers`` layers, and a tiny vision tower that still gives the real token count per
    frame (``bench.generation.vision_config``: 448 px, patch 14 -> 256 tokens)."""
    opts = bench.opts.generation
    # composed, not read as a file: the preset's text config extends its base's (vocabulary)
    shape = compose_config("train", [f"model={opts.shape}"]).model
    model = copy.deepcopy(bench.cfg.model)
    with open_dict(model):
        model.name = f"{opts.shape}_llm_{layers}_layers"
        model.mllm.config.text_config = shape.mllm.config.text_config
        model.mllm.config.text_config.num_hidden_layers = layers
        model.mllm.config.vision_config.update(opts.vision_config)
    return model


@contextlib.contextmanager
def scoring_every_position(model: Sa2VA) -> Iterator[None]:
    """``fast`` as it ran before: the output layer scores every position of the sequence
    (nothing reads those logits); the rest of the pass is unchanged."""

    def keep_all(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "logits_to_keep": 0}

    handle = model.mllm.register_forward_pre_hook(keep_all, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def bench_generation(bench: Bench) -> Results:
    """Per LLM depth: ``generate`` (answer forced) / ``fast``, and ``fast`` / the former
    full-vocabulary ``fast``, per frame, on random weights of a real LLM shape."""
    opts = bench.opts.generation
    rows = []
    for layers in opts.layers:
        rows += _depth_rows(bench, int(layers))
    return Results(rows=rows)


def _depth_rows(bench: Bench, layers: int) -> list[Row]:
    opts = bench.opts.generation
    module, datamodule = bench.build(bench.config(model=llm_shape_model(bench, layers)))
    model = module.model.eval()
    if opts.dtype:  # the whole model, so the [SEG] states meet a projector of their dtype
        model.to(getattr(torch, opts.dtype))
    records = next(iter(datamodule.videos("test").values()))[: int(opts.frames)]
    frames = [load_rgb(r.image_path) for r in records]
    prompt = datamodule.prompt_template.format(name=records[0].object_names[0])
    answer = str(opts.answer)
    fast_answer = answer.split(model.processor.template.suffix)[0]
    batches = [model.prepare_inputs([f], [prompt], answer=fast_answer)[0] for f in frames]

    def generate() -> list[dict[str, Any]]:
        return [
            model.predict_forward(
                [f], [prompt], "generate", max_new_tokens=int(opts.max_new_tokens),
                logits_processor=forced_answer(model.tokenizer, answer),
            )
            for f in frames
        ]  # fmt: skip

    def fast() -> list[torch.Tensor]:
        return [model(batch).pred_masks[0] for batch in batches]

    def before() -> list[torch.Tensor]:
        with scoring_every_position(model):
            return fast()

    n = len(frames)
    variants = {"generate": generate, "fast": fast}
    if opts.before:
        variants["before"] = before
    with torch.no_grad():
        medians, outputs = interleave(
            {name: per_item(bench.clock, call, n) for name, call in variants.items()},
            bench.repeats,
            bench.warmup,
        )
    atol = float(opts.atol)
    generated = [o["masks"] for o in outputs["generate"]]
    texts = sorted({o["text"][0] for o in outputs["generate"]})
    tokens = int(batches[0]["attention_mask"].sum())
    width = model.mllm.config.text_config.hidden_size
    shape = (
        f"{opts.shape} LLM cut to {layers} layers (width {width}, vocabulary "
        f"{model.mllm.get_input_embeddings().weight.shape[0]:,}), random weights; "
        f"{tokens} tokens per frame ({n} frame(s) per round)"
    )
    rows = [
        Row(
            "generation",
            f"generate / fast at {layers} LLM layers, s per frame",
            medians["generate"],
            medians["fast"],
            "s/frame",
            goal=str(opts.goal) if layers >= int(opts.goal_layers) else None,
            identical=texts == [fast_answer] and max_diff(generated, outputs["fast"]) <= atol,
            note=f"{shape}; answer forced by a logits processor: {texts}; masks within "
            f"{atol} of fast's (max |diff| {max_diff(generated, outputs['fast']):.1e})",
        )
    ]
    if opts.before:
        rows.append(
            Row(
                "generation",
                f"fast / fast with vocabulary logits (before) at {layers} LLM layers, s per frame",
                medians["fast"],
                medians["before"],
                "s/frame",
                identical=max_diff(outputs["fast"], outputs["before"]) <= atol,
                note="before: the output layer scored every position and nothing read it",
            )
        )
    return rows
