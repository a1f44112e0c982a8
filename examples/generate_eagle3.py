"""Generate with an EAGLE-3 head inside transformers' own `generate`, and read what it bought.

    python examples/generate_eagle3.py                       # SmolLM2-135M-Instruct + the head shipped in the package
    python examples/generate_eagle3.py --target ID --head H  # any causal LM and a head made for it

Runs the prompt with plain greedy `generate`, then with the head in tree and in chain mode, and prints the
text, whether it is identical, tokens/s and the per-call statistics (`out.eagle3_stats`).
"""

from __future__ import annotations

import argparse
import time

import torch

# The first name used from hf_eagle3 installs the assistant_model hook into transformers' generate.
from hf_eagle3 import Eagle3DraftModel, load_target, shipped_head_path


def timed_generate(target, inputs, **kwargs):
    start = time.perf_counter()
    out = target.generate(**inputs, do_sample=False, max_new_tokens=128, return_dict_in_generate=True, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2", help="offline name (smollm2, qwen-coder), Hub id or folder")
    parser.add_argument("--head", help="head folder or Hub id (default: the head shipped for --target)")
    parser.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # judge token identity in float32
    target, tokenizer = load_target(args.target, dtype=dtype, device=device)
    draft = Eagle3DraftModel.from_pretrained(args.head or shipped_head_path(args.target), dtype=dtype)
    draft = draft.to(device).attach_target(target)

    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(device)
    prompt_length = inputs["input_ids"].shape[1]

    plain, plain_seconds = timed_generate(target, inputs)
    reference = plain.sequences[0, prompt_length:]
    print(tokenizer.decode(reference, skip_special_tokens=True))
    print(f"\nplain generate: {len(reference) / plain_seconds:.1f} tokens/s")
    for mode in ("tree", "chain"):
        out, seconds = timed_generate(target, inputs, assistant_model=draft, eagle3_mode=mode)
        tokens = out.sequences[0, prompt_length:]
        stats = out.eagle3_stats
        print(
            f"eagle3 {mode}: {len(tokens) / seconds:.1f} tokens/s, identical text: {torch.equal(tokens, reference)}, "
            f"mean acceptance length {stats.mean_accept_len:.2f}, "
            f"acceptance per depth {[round(rate, 2) for rate in stats.acceptance_rate_per_depth]}"
        )


if __name__ == "__main__":
    main()
