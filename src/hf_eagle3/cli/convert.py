"""`hf-eagle3 convert`: rewrite a draft head in another checkpoint layout."""

from __future__ import annotations

import argparse

from ..checkpoint_formats import FORMATS, SPECFORGE_LAYOUT, SPECULATORS_LAYOUT, load_target_embedding
from ..configuration_eagle3 import default_target_layer_ids
from ..safe_writes import check_folder_destination, staged_folder


def main(argv: list[str]) -> int:
    """`hf-eagle3 convert SRC DST --to FORMAT`: rewrite a head in another layout."""
    from ..modeling_eagle3 import Eagle3DraftModel
    from ..offline_models import load_target_config

    parser = argparse.ArgumentParser(
        prog="hf-eagle3 convert",
        description="Convert an EAGLE-3 draft head between this library's, the official, SpecForge/SGLang and "
        "speculators/vLLM checkpoint layouts. The source layout is detected.",
    )
    parser.add_argument("src", help="local directory or hub repo id of the head")
    parser.add_argument("dst", help="output directory: new or empty, or any with --overwrite")
    parser.add_argument("--to", required=True, choices=list(FORMATS), help="layout to write")
    positions = parser.add_mutually_exclusive_group()
    positions.add_argument(
        "--target_max_position_embeddings",
        "--target-max-position-embeddings",
        type=int,
        help="raise the head's max_position_embeddings to the target's context (engines stop drafting beyond it)",
    )
    positions.add_argument(
        "--target",
        help="the target (a registered offline target such as smollm2, a directory or a Hub id): checks the head "
        "fits it, fills in its default layer ids, covers its max_position_embeddings, and is named as the target "
        "(vllm/speculators also store its embedding, read from its weights)",
    )
    parser.add_argument("--revision", help="hub revision of SRC")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it already holds files")
    args = parser.parse_args(argv)
    check_folder_destination(args.dst, args.overwrite, flag="--overwrite")  # before loading SRC, which may be large

    model = Eagle3DraftModel.from_pretrained(args.src, **({"revision": args.revision} if args.revision else {}))
    max_positions = args.target_max_position_embeddings
    if args.target:
        target_config = load_target_config(args.target)
        model.check_target(target_config)
        text_config = target_config.get_text_config()
        if model.config.target_layer_ids is None:
            model.config.target_layer_ids = default_target_layer_ids(text_config.num_hidden_layers)
        model.config.target_num_hidden_layers = text_config.num_hidden_layers
        # The target the user names is the one engines must load (speculators and vLLM read it as the verifier).
        model.config.target_name_or_path = args.target
        model.config.target_architectures = target_config.architectures or model.config.target_architectures
        max_positions = text_config.max_position_embeddings
        if FORMATS[args.to] == SPECULATORS_LAYOUT:
            embedding = load_target_embedding(args.target)
            # The layout stores the target's own table; rounding it to the head's precision would change the draft.
            model.to(embedding.dtype).set_target_embeddings(embedding)
    # Written beside DST and moved into place when complete: SRC may be DST itself, and a failed write keeps DST.
    with staged_folder(args.dst, overwrite=args.overwrite, flag="--overwrite") as staging:
        model.save_pretrained(staging, format=args.to, target_max_position_embeddings=max_positions)

    written = max(model.config.max_position_embeddings, max_positions or 0)
    ids = model.config.target_layer_ids
    print(f"Wrote {args.dst} in the {args.to!r} layout ({FORMATS[args.to]}).")
    print(f"  target layer ids (input of layer i): {ids if ids is not None else 'default [2, L//2, L-3]'}")
    if ids is not None and FORMATS[args.to] == SPECFORGE_LAYOUT:
        print(f"  stored as SpecForge/SGLang 'output of layer' ids: {[i - 1 for i in ids]}")
    print(f"  max_position_embeddings: {written}")
    if max_positions is None:
        print("  (pass --target or --target_max_position_embeddings to make it cover the target's context)")
    return 0
