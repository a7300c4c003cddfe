"""Stage 2 for text scenes: K sampled descriptions of each scene from a causal LM, in one ``generate`` call.

The model sees :func:`scene_instruction` (the facts, then the request) as the user turn of its own chat
template; the K candidates are ``num_return_sequences`` of one prompt, sampled with the upstream settings
(temperature 0.9, top_p 0.95, top_k 32). There is no refinement pass (the video pipeline's
retrospective pass re-watches the frames; a text scene has nothing to re-read that the prompt lacks).
Sampling is seeded per scene from ``seed`` and the scene id, so a resumed run equals an uninterrupted one.

Record (one per scene)::

    {"id", "status": "ok", "prompt", "facts", "candidates": [{"index", "text"}], "settings": {...}}

``prompt`` is the instruction exactly as the model got it, minus the chat template: it becomes the
training pairs' prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from synpo.pairs.candidates import UPSTREAM_SAMPLING, video_seed
from synpo.pairs.io import STATUS_OK
from synpo.pairs.runner import item_stage
from synpo.pairs.scenes import Scene
from synpo.pairs.vlm import TINY_MODEL, Sampling

SCENE_INSTRUCTION = (
    "Here are the facts about a scene:\n{facts}\n\n"
    "Describe the scene in 2 to 4 sentences of plain prose. Use only these facts; do not add anything "
    "that they do not say."
)
# Upstream sampling with a short answer: 2-4 sentences fit in ~64 tokens and CPU time is per token.
TEXT_SAMPLING = Sampling(
    do_sample=True,
    temperature=UPSTREAM_SAMPLING.temperature,
    top_p=UPSTREAM_SAMPLING.top_p,
    top_k=UPSTREAM_SAMPLING.top_k,
    max_new_tokens=64,
)


def scene_instruction(facts: tuple[str, ...] | list[str]) -> str:
    if not facts:
        raise ValueError("facts must not be empty")
    return SCENE_INSTRUCTION.format(facts="\n".join(f"- {fact}" for fact in facts))


def load_text_model(spec: str, *, gguf_file: str | None = None, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) in eval mode: synpo.tiny's random LM for ``"tiny"``, else the trainer's loader
    (:func:`synpo.models.load_model`: a Hub id, a folder or ``pkg:NAME``, with an optional GGUF file).
    ``dtype`` auto: bfloat16 on CUDA, float32 on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if spec == TINY_MODEL:
        from synpo.pairs.vlm import load_causal_lm

        return load_causal_lm(TINY_MODEL, device=device, dtype=dtype)
    from synpo.config import ModelConfig
    from synpo.models import load_model

    torch_device = torch.device(device)
    loaded = load_model(ModelConfig(name_or_path=spec, gguf_file=gguf_file, dtype=dtype), device=torch_device)
    if loaded.is_vision:
        raise ValueError(f"--model {spec}: a vision-language model; text scenes need a causal LM")
    return loaded.model.to(torch_device).eval(), loaded.tokenizer


class TextGenerator:
    """K sampled answers to one user turn, through the tokenizer's chat template."""

    def __init__(self, model, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; text candidates use the model's template")
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, instruction: str, sampling: Sampling, num_return_sequences: int) -> list[str]:
        tokenizer = self.tokenizer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        # The template already writes the BOS token it wants; a second one shifts the model off-distribution.
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = self.model.generate(
            **inputs,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=pad,
            use_cache=True,  # the trainer's loader turns the cache off for training
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [answer.strip() for answer in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@dataclass(frozen=True)
class TextCandidateSettings:
    num_candidates: int = 8
    sampling: Sampling = TEXT_SAMPLING
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.num_candidates, int) or self.num_candidates < 2:
            raise ValueError(
                f"num_candidates must be an int >= 2 (a pair needs two), got {self.num_candidates!r}"
            )
        if not self.sampling.do_sample:
            raise ValueError("candidates need sampling (do_sample=True): greedy gives K identical texts")

    def to_dict(self) -> dict:
        return {"num_candidates": self.num_candidates, "sampling": self.sampling.to_dict(), "seed": self.seed}


def generate_scene_candidates(
    generator: TextGenerator, scene: Scene, settings: TextCandidateSettings
) -> dict:
    instruction = scene_instruction(scene.facts)
    torch.manual_seed(video_seed(settings.seed, scene.id))
    texts = generator.generate(instruction, settings.sampling, settings.num_candidates)
    return {
        "id": scene.id,
        "status": STATUS_OK,
        "prompt": instruction,
        "facts": list(scene.facts),
        "candidates": [{"index": index, "text": text} for index, text in enumerate(texts)],
        "settings": settings.to_dict(),
    }


run_scene_candidates = item_stage("candidates", generate_scene_candidates, unit="scene")
