"""SynPO's preference-pair pipeline: clip captions, candidates, LLM-judge scores, chosen/rejected pairs.

Stages (each a ``synpo pairs`` command and a ``run_*`` function; each appends JSONL and resumes):
:mod:`~synpo.pairs.clips`, :mod:`~synpo.pairs.candidates`, :mod:`~synpo.pairs.score` (with the judge
back ends in :mod:`~synpo.pairs.judge`) and :mod:`~synpo.pairs.select`. Video decoding is in
:mod:`synpo.video` (shared with training), model plumbing in :mod:`~synpo.pairs.vlm`, prompts in
:mod:`~synpo.pairs.prompts`. See docs/pairs.md.
"""
