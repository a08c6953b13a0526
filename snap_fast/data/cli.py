"""``snap-fast data``: build the forget / hard-positive / held-out sets for one target."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..generation import DEFAULT_GEN_BATCH_SIZE
from .build import DEFAULT_SIZES
from .target import TargetSpec, builtin_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``snap-fast data`` options on ``parser``."""
    t = parser.add_argument_group("target")
    t.add_argument("--target", help='name of what to forget, e.g. "Harry Potter"')
    t.add_argument("--aliases", nargs="+", default=None, metavar="ALIAS", help="other names of the target")
    t.add_argument("--description", help="short description, used for indirect questions")
    t.add_argument("--facts", nargs="+", default=None, metavar="FACT", help="known facts (for leak checks)")
    t.add_argument("--neighbours", nargs="+", default=None, metavar="NAME",
                   help="neighbour entities to keep (default: built-in preset, else proposed by the model)")
    t.add_argument("--category", choices=["person", "character", "work", "place", "organization"])
    t.add_argument("--target-file", help="YAML/JSON target spec (flags override its fields)")
    m = parser.add_argument_group("model")
    m.add_argument("--model", default="smollm2-135m-instruct",
                   help="hub id, local folder, .gguf file or smollm2-135m-instruct (default)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--device", default="cpu")
    m.add_argument("--trust-remote-code", action="store_true")
    g = parser.add_argument_group("generation")
    g.add_argument("--generator", choices=["patterns", "self", "endpoint"], default=None,
                   help="extra forget questions from: patterns only (default), the model itself, "
                        "or an OpenAI-compatible endpoint (default when --endpoint is given)")
    g.add_argument("--endpoint", help="OpenAI-compatible API base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--endpoint-model", help="model name for the endpoint")
    g.add_argument("--api-key-env", help="environment variable holding the endpoint's API key")
    g.add_argument("--forget-jsonl", help="JSONL of extra forget questions ('prompt' per line)")
    g.add_argument("--general-file", help="extra general instructions (Alpaca or ShareGPT JSON/JSONL)")
    g.add_argument("--no-originals", action="store_true",
                   help="do not generate the original model's answers (retain responses stay empty)")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_SIZES["max_new_tokens"],
                   help="length of original answers (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=DEFAULT_GEN_BATCH_SIZE, help="prompts per generation call")
    s = parser.add_argument_group("sizes (at most; the defaults are the validated recipe's data)")
    for name in ("n_forget", "n_retain", "n_general", "n_heldout_forget", "n_heldout_retain", "n_heldout_general"):
        s.add_argument("--" + name.replace("_", "-"), type=int, default=DEFAULT_SIZES[name],
                       help="default: %(default)s")
    o = parser.add_argument_group("output")
    o.add_argument("--out", required=True, help="data folder to write")
    o.add_argument("--overwrite", action="store_true", help="replace an existing data folder")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--cache-dir", help="originals cache folder (default: <snap_fast cache>/originals)")
    o.add_argument("--no-progress", action="store_true")


def resolve_target(args: argparse.Namespace) -> TargetSpec:
    """The target spec from ``--target-file`` and flags (flags win); a known preset fills the
    fields the user left out (e.g. the Harry Potter neighbours)."""
    data: dict = {}
    if args.target_file:
        data = TargetSpec.from_file(args.target_file).to_dict()
    for key in ("aliases", "description", "facts", "neighbours", "category"):
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    if args.target is not None:
        data["name"] = args.target
    if "name" not in data:
        raise ValueError("give a target with --target NAME or --target-file FILE")
    if not str(data["name"]).strip():
        raise ValueError("--target must not be empty or whitespace")
    preset = builtin_target(data["name"])
    if preset is not None:
        for key, value in preset.to_dict().items():
            # neighbours stay empty: build_dataset takes the preset's and records them as "builtin"
            if key != "neighbours" and not data.get(key):
                data[key] = value
    return TargetSpec.from_dict(data)


def run(args: argparse.Namespace) -> int:
    """Run ``snap-fast data``; returns the exit code (2 for bad input, 1 for endpoint errors)."""
    import torch

    from .build import build_dataset
    from .generators import EndpointError, EndpointGenerator

    try:
        # Everything checkable is checked before the model is loaded.
        target = resolve_target(args)
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty; use --overwrite")
        for flag, path in (("--forget-jsonl", args.forget_jsonl), ("--general-file", args.general_file)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} file not found: {path}")
        generator_name = args.generator or ("endpoint" if args.endpoint else "patterns")
        generator = generator_name
        if generator_name == "endpoint":
            if not args.endpoint or not args.endpoint_model:
                raise ValueError("--generator endpoint needs --endpoint URL and --endpoint-model NAME")
            generator = EndpointGenerator(args.endpoint, args.endpoint_model, api_key_env=args.api_key_env,
                                          progress=not args.no_progress)
        elif args.endpoint:
            raise ValueError(f"--endpoint given but --generator is {generator_name!r}")
        for name in ("n_forget", "n_retain", "n_heldout_forget", "n_heldout_retain", "n_heldout_general",
                     "max_new_tokens", "batch_size"):
            if getattr(args, name) < (1 if name in ("n_forget", "max_new_tokens", "batch_size") else 0):
                raise ValueError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")

        preset = builtin_target(target.name)
        proposes_neighbours = not target.neighbours and not (preset and preset.neighbours)
        needs_model = not args.no_originals or generator_name == "self" or (
            proposes_neighbours and generator_name == "patterns")
        model = tokenizer = model_id = None
        if needs_model:
            from ..models import load_model, model_identity

            print(f"loading {args.model} ...", file=sys.stderr)
            model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                                          trust_remote_code=args.trust_remote_code)
            model_id = model_identity(args.model, model)
        summary = build_dataset(
            target, out, model=model, tokenizer=tokenizer, model_id=model_id, generator=generator,
            n_forget=args.n_forget, n_retain=args.n_retain, n_general=args.n_general,
            n_heldout_forget=args.n_heldout_forget, n_heldout_retain=args.n_heldout_retain,
            n_heldout_general=args.n_heldout_general, user_forget=args.forget_jsonl,
            general_file=args.general_file, seed=args.seed, generate_originals=not args.no_originals,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, cache_dir=args.cache_dir,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except EndpointError as e:
        print(f"snap-fast data: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        print(f"snap-fast data: error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0
