"""synpo pairs {clips,candidates,score,select,scenes}: the preference-pair pipeline, one stage per command.

Videos: clips -> candidates -> score -> select. Text scenes (facts instead of clip captions): scenes ->
candidates --scenes -> score --judge text -> select.

Every stage appends to its ``--out`` JSONL and skips ids already there, so re-running a command after
an interruption continues where it stopped. ``<out>.settings.json`` records the settings that made
``--out``: a rerun with other settings is refused unless ``--overwrite`` (which starts over). A stage
in which no item succeeded exits 1. See docs/pairs.md for an end-to-end walk-through.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

TINY_HELP = "'tiny' builds synpo.tiny's random test model (no download; output is gibberish)"


def add_parser(subparsers) -> None:
    pairs = subparsers.add_parser(
        "pairs",
        help="build preference pairs: clips, candidates, score, select",
        description=__doc__.splitlines()[0],
    )
    stages = pairs.add_subparsers(dest="pairs_command", metavar="STAGE")
    pairs.set_defaults(func=lambda args: (pairs.print_help(), 2)[1])
    _add_clips(stages)
    _add_candidates(stages)
    _add_score(stages)
    _add_select(stages)
    _add_scenes(stages)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _common(parser: argparse.ArgumentParser, *, out_help: str, resumable: bool = True) -> None:
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an existing --out made with other settings (a rerun with the same settings resumes)",
    )
    if resumable:
        parser.add_argument(
            "--retry-failed", action="store_true", help="redo ids whose latest record in --out failed"
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _videos(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", nargs="*", help="video files and/or folders (searched recursively)")
    parser.add_argument(
        "--manifest", help="JSONL with 'video' and optional 'id' per line, or a text file of video paths"
    )


def _vlm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help=f"HF vision-language model folder or hub id; {TINY_HELP}"
    )
    parser.add_argument(
        "--frames-as",
        choices=("auto", "images", "video"),
        default="auto",
        help="frames as one image each or as one video (auto: video if the processor has a video processor)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument(
        "--max-side", type=_positive_int, help="downscale decoded frames to this longest side"
    )


def _add_clips(stages) -> None:
    parser = stages.add_parser(
        "clips",
        help="split videos into uniform clips and caption each (with a self-retrospective pass)",
        description="Clip captions: N = clamp(floor(duration / clip-seconds) + 1, min-clips, max-clips) "
        "uniform clips per video, each captioned greedily from uniform frames, then refined.",
    )
    _videos(parser)
    _vlm(parser)
    parser.add_argument("--frames-per-clip", type=_positive_int, default=8)
    parser.add_argument("--clip-seconds", type=_positive_float, default=10.0)
    parser.add_argument("--min-clips", type=_positive_int, default=2)
    parser.add_argument("--max-clips", type=_positive_int, default=16)
    parser.add_argument("--max-new-tokens", type=_positive_int, default=800)
    parser.add_argument("--no-refine", action="store_true", help="skip the self-retrospective pass")
    _common(parser, out_help="clip captions JSONL (appended)")
    parser.set_defaults(func=_guarded("clips", _run_clips))


def _add_candidates(stages) -> None:
    parser = stages.add_parser(
        "candidates",
        help="sample K candidate descriptions per video (each refined) or per text scene (--scenes)",
        description="Candidates: K sampled descriptions of clamp(round(duration * fps), min-frames, "
        "max-frames) uniform frames, each followed by a sampled refinement pass; with --scenes, K sampled "
        "descriptions of each scene's facts from a causal LM (one generate call per scene, no refinement).",
    )
    _videos(parser)
    _vlm(parser)
    text = parser.add_argument_group("text scenes")
    text.add_argument(
        "--scenes", help="scenes JSONL from 'synpo pairs scenes': describe these instead of videos"
    )
    text.add_argument(
        "--gguf-file", help="with --scenes: the GGUF file inside --model (a folder, hub id or pkg:NAME)"
    )
    text.add_argument(
        "--threads", type=_non_negative_int, default=0, help="CPU threads for torch (0: torch's default)"
    )
    parser.add_argument("--num-candidates", type=int, default=10, help="K (>= 2)")
    parser.add_argument("--temperature", type=_positive_float, default=0.9)
    parser.add_argument("--top-p", type=_positive_float, default=0.95)
    parser.add_argument("--top-k", type=_non_negative_int, default=32, help="0 disables top-k")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, help="default: 1024 for videos, 64 for --scenes"
    )
    parser.add_argument("--fps", type=_positive_float, default=0.5, help="frames per second of video")
    parser.add_argument("--min-frames", type=_positive_int, default=8)
    parser.add_argument("--max-frames", type=_positive_int, default=16)
    parser.add_argument(
        "--decoding",
        choices=("sample", "contrastive"),
        default="sample",
        help="contrastive: strong*logits(all frames) - weak*logits(a fraction of the frames)",
    )
    parser.add_argument(
        "--cd-strong", type=float, default=1.5, help="contrastive: weight of the all-frames logits"
    )
    parser.add_argument("--cd-weak", type=float, default=0.5, help="contrastive: weight of the weak logits")
    parser.add_argument(
        "--cd-weak-fraction",
        type=float,
        default=1 / 3,
        help="contrastive: share of frames in the weak context",
    )
    parser.add_argument("--no-refine", action="store_true", help="skip the refinement pass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (combined with each video id)")
    _common(parser, out_help="candidates JSONL (appended)")
    parser.set_defaults(func=_guarded("candidates", _run_candidates))


def _add_score(stages) -> None:
    parser = stages.add_parser(
        "score",
        help="score candidates with an LLM judge (hallucination, harmony, self-consistency)",
        description="Judge scores: 1.1 * hallucination (0-5) + harmony (0-5) + consistency (0-3).",
    )
    parser.add_argument("--clips", help="clip captions JSONL from 'synpo pairs clips' (http/local judges)")
    parser.add_argument(
        "--scenes", help="scenes JSONL from 'synpo pairs scenes' (--judge text: facts in the clips' role)"
    )
    parser.add_argument("--candidates", required=True, help="candidates JSONL from 'synpo pairs candidates'")
    parser.add_argument(
        "--judge",
        choices=("http", "local", "text"),
        required=True,
        help="judge back end; text: the rule-based + sentence-embedding judge for --scenes (docs/pairs.md)",
    )
    parser.add_argument(
        "--judge-model",
        help=f"http: the model name the endpoint serves; local: a causal LM folder or hub id ({TINY_HELP}); "
        "text: unused",
    )
    http = parser.add_argument_group("http judge")
    http.add_argument("--judge-url", help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    http.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (read, never printed); unset: no auth header",
    )
    http.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds per request")
    http.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight at most")
    http.add_argument("--json-mode", action="store_true", help="send response_format={'type': 'json_object'}")
    retry = parser.add_argument_group("retries (http: timeouts, 429, 5xx, malformed answers)")
    retry.add_argument("--max-retries", type=_non_negative_int, default=4)
    retry.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds; doubles")
    retry.add_argument("--backoff-max", type=float, default=30.0)
    local = parser.add_argument_group("local judge")
    local.add_argument(
        "--constrained",
        action="store_true",
        help="pick the most likely valid answer instead of generating free text (always parseable)",
    )
    local.add_argument("--device", default="auto")
    local.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--judge-max-tokens", type=_positive_int, default=256, help="answer length limit")
    _common(parser, out_help="scores JSONL (appended)")
    parser.set_defaults(func=_guarded("score", _run_score))


def _add_select(stages) -> None:
    parser = stages.add_parser(
        "select",
        help="pick best/worst candidates per video into the training JSONL",
        description="Chosen = best, rejected = worst combined score; kept when the gap >= --min-score-gap.",
    )
    parser.add_argument("--scores", required=True, help="scores JSONL from 'synpo pairs score'")
    parser.add_argument("--min-score-gap", type=float, default=4.0, help="upstream: 4 (scores span 0-13.5)")
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="also use videos where some judge calls failed (their scored candidates only)",
    )
    parser.add_argument(
        "--heldout-out", help="held-out pairs JSONL (appended): pairs whose id hashes below the fraction"
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.0,
        help="share of ids (by a hash of the id, so deterministic) written to --heldout-out, in [0, 1)",
    )
    _common(parser, out_help="training pairs JSONL (appended)", resumable=False)
    parser.set_defaults(func=_guarded("select", _run_select))


def _add_scenes(stages) -> None:
    parser = stages.add_parser(
        "scenes",
        help="generate text scenes (3-5 short facts each) to describe instead of videos",
        description="Scenes: NUM procedurally generated scenes (a place plus objects, people, animals, "
        "weather), scene i a function of (seed, i) only; the file is rewritten whole.",
    )
    parser.add_argument("--num", type=_positive_int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="scenes JSONL (replaced)")
    parser.set_defaults(func=_guarded("scenes", _run_scenes))


def _guarded(stage: str, run):
    """Bad arguments or inputs (ValueError, missing files) end with one clear line, not a traceback."""

    def guarded(args) -> int:
        try:
            return run(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"synpo pairs {stage}: error: {exc}", file=sys.stderr)
            return 2

    return guarded


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _items(args):
    from synpo.pairs.io import resolve_videos

    return resolve_videos(args.videos, args.manifest)


def _captioner(args):
    from synpo.pairs.vlm import VideoCaptioner, load_vlm

    model, processor = load_vlm(args.model, device=args.device, dtype=args.dtype)
    return VideoCaptioner(model, processor, frames_as=args.frames_as)


def _claim(args, stage: str, settings: dict) -> None:
    from synpo.pairs.io import claim_output

    claim_output(args.out, stage, settings, overwrite=args.overwrite)


def _report(summary) -> int:
    """Print the summary; exit 1 when items were given but none has an ok record in the output."""
    print(summary)
    if summary.stage != "select" and summary.total and not (summary.ok or summary.skipped_done):
        failed = summary.failed + summary.skipped_failed
        print(
            f"synpo pairs {summary.stage}: error: no item succeeded ({failed} failed; see the errors "
            f"above and in {summary.output})",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_video_stage(args, stage: str, settings, run) -> int:
    """The VLM stages: resolve the videos, claim --out for these settings, load the model, run."""
    items = _items(args)
    _claim(args, stage, {"model": args.model, **dataclasses.asdict(settings)})
    return _report(run(items, _captioner(args), args.out, settings, **_resume_options(args)))


def _resume_options(args) -> dict:
    """The keyword options every resumable stage runner takes from the command line."""
    return {"retry_failed": args.retry_failed, "progress": not args.no_progress}


def _run_clips(args) -> int:
    from synpo.pairs.clips import ClipSettings, run_clips

    _setup_logging()
    settings = ClipSettings(
        clip_seconds=args.clip_seconds,
        min_clips=args.min_clips,
        max_clips=args.max_clips,
        frames_per_clip=args.frames_per_clip,
        max_new_tokens=args.max_new_tokens,
        refine=not args.no_refine,
        max_side=args.max_side,
    )
    return _run_video_stage(args, "clips", settings, run_clips)


def _run_scenes(args) -> int:
    from synpo.pairs.scenes import generate_scenes, write_scenes

    scenes = generate_scenes(args.num, args.seed)
    write_scenes(scenes, args.out)
    print(f"scenes: {len(scenes)} written -> {args.out}")
    return 0


def _run_scene_candidates(args, sampling) -> int:
    import torch

    from synpo.pairs.scenes import read_scenes
    from synpo.pairs.text import TextCandidateSettings, TextGenerator, load_text_model, run_scene_candidates

    if args.videos or args.manifest:
        raise ValueError("--scenes replaces videos and --manifest; give one or the other")
    if args.threads:
        torch.set_num_threads(args.threads)
    scenes = read_scenes(args.scenes)
    settings = TextCandidateSettings(num_candidates=args.num_candidates, sampling=sampling, seed=args.seed)
    _claim(
        args,
        "candidates",
        {
            "model": args.model,
            "gguf_file": args.gguf_file,
            "dtype": args.dtype,
            "scenes": os.path.abspath(args.scenes),
            **settings.to_dict(),
        },
    )
    model, tokenizer = load_text_model(
        args.model, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype
    )
    generator = TextGenerator(model, tokenizer)
    return _report(run_scene_candidates(scenes, generator, args.out, settings, **_resume_options(args)))


def _run_candidates(args) -> int:
    from synpo.pairs.candidates import CandidateSettings, run_candidates
    from synpo.pairs.vlm import Contrastive, Sampling

    _setup_logging()
    sampling = Sampling(
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens or (64 if args.scenes else 1024),
    )
    if args.scenes:
        return _run_scene_candidates(args, sampling)
    contrastive = None
    if args.decoding == "contrastive":
        contrastive = Contrastive(args.cd_strong, args.cd_weak, args.cd_weak_fraction)
    settings = CandidateSettings(
        num_candidates=args.num_candidates,
        sampling=sampling,
        contrastive=contrastive,
        refine=not args.no_refine,
        fps=args.fps,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        max_side=args.max_side,
        seed=args.seed,
    )
    return _run_video_stage(args, "candidates", settings, run_candidates)


def _run_text_score(args) -> int:
    from synpo.pairs.scenes import read_scenes
    from synpo.pairs.textjudge import TextJudge, judge_settings, run_text_score

    if not args.scenes or args.clips:
        raise ValueError("--judge text needs --scenes (and takes no --clips)")
    scenes = read_scenes(args.scenes)
    _claim(
        args,
        "score",
        {
            **judge_settings(),
            "scenes": os.path.abspath(args.scenes),
            "candidates": os.path.abspath(args.candidates),
        },
    )
    return _report(run_text_score(scenes, args.candidates, args.out, TextJudge(), **_resume_options(args)))


def _run_score(args) -> int:
    from synpo.pairs.judge import HTTPJudge, JudgeConfigError, LocalJudge, RetryPolicy
    from synpo.pairs.score import run_score

    _setup_logging()
    if args.judge == "text":
        return _run_text_score(args)
    if not args.clips or args.scenes:
        raise ValueError(f"--judge {args.judge} needs --clips (--scenes goes with --judge text)")
    if not args.judge_model:
        raise ValueError(f"--judge-model is required with --judge {args.judge}")
    policy = RetryPolicy(max_retries=args.max_retries, backoff=args.backoff, backoff_max=args.backoff_max)
    judge = {"judge": args.judge, "judge_model": args.judge_model, "judge_url": args.judge_url}
    _claim(
        args,
        "score",
        {**judge, "clips": os.path.abspath(args.clips), "candidates": os.path.abspath(args.candidates)},
    )
    if args.judge == "http":
        if not args.judge_url:
            raise ValueError("--judge-url is required with --judge http")
        backend = HTTPJudge(
            args.judge_url,
            args.judge_model,
            api_key_env=args.api_key_env or None,
            timeout=args.timeout,
            max_tokens=args.judge_max_tokens,
            max_concurrency=args.concurrency,
            json_mode=args.json_mode,
        )
    else:
        from synpo.pairs.vlm import load_causal_lm

        model, tokenizer = load_causal_lm(args.judge_model, device=args.device, dtype=args.dtype)
        backend = LocalJudge(
            model,
            tokenizer,
            max_new_tokens=args.judge_max_tokens,
            constrained=args.constrained,
            label=args.judge_model,
        )
    try:
        summary = run_score(args.clips, args.candidates, args.out, backend, policy, **_resume_options(args))
    except JudgeConfigError as exc:
        print(f"synpo pairs score: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    return _report(summary)


def _run_select(args) -> int:
    from synpo.pairs.select import run_select

    _setup_logging()
    settings = {
        "scores": os.path.abspath(args.scores),
        "min_score_gap": args.min_score_gap,
        "allow_partial": args.allow_partial,
    }
    if args.heldout_out:
        settings["heldout_fraction"] = args.heldout_fraction
    _claim(args, "select", settings)
    if args.heldout_out:
        # The held-out file is the other half of the same selection: same settings, same claim rules.
        _claim(argparse.Namespace(out=args.heldout_out, overwrite=args.overwrite), "select", settings)
    summary = run_select(
        args.scores,
        args.out,
        min_score_gap=args.min_score_gap,
        allow_partial=args.allow_partial,
        progress=not args.no_progress,
        heldout_output=args.heldout_out,
        heldout_fraction=args.heldout_fraction,
    )
    return _report(summary)
