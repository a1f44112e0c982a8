"""Check that the peers' own code loads hf-eagle3's exports right, and that hf-eagle3 loads SpecForge's heads right.

Each peer runs in a throwaway venv of its own (created here when absent), never inside this project:

- official EAGLE (SafeAILab/EAGLE source, transformers 4.53): `EaModel.from_pretrained` on the `eagle3` export;
- speculators 0.9.0: `SpeculatorModel.from_pretrained` on the `speculators` export, run from an unrelated working
  directory (it resolves the verifier named in the config);
- SpecForge 0.2.0: its draft class `LlamaForCausalLMEagle3` on the `specforge` export, and heads it writes itself
  with `norm_output` true and false, loaded here.

The shipped SmolLM2 head and target run in float32 on the CPU; every side scores the same inputs (the target's
features of one prompt and the shifted ids) and the logits are compared. Usage:

    PYTHONPATH=src python benchmarks/interop/check_interop.py [--peers-dir /work/peers] [--tolerance 1e-3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_eagle3
from hf_eagle3 import Eagle3DraftModel
from hf_eagle3.cli import main as cli_main
from hf_eagle3.target_features import TargetFeatureCapture
from hf_eagle3.trainer.ttt import unroll_draft

HERE = Path(__file__).parent
PROMPT = "Write a short poem about the sea, then explain which images you chose and why."
# What each peer needs in its venv; torch is the CPU build.
PEER_REQUIREMENTS = {
    "eagle": ["torch==2.13.0", "transformers==4.53.3", "accelerate", "safetensors"],
    "spec": ["torch==2.13.0", "speculators==0.9.0"],
    # SpecForge pins an older torch and the SGLang server; its draft class needs neither.
    "sf": ["torch==2.13.0", "transformers==5.8.1", "accelerate", "safetensors", "pydantic", "pyyaml", "psutil"],
}
# EAGLE-3.1 switch sets checked in both directions: every speculators/vLLM switch appears in one of them
# (speculators refuses `norm_before_fc` with `fc_norm`), and SpecForge's two readings of `norm_output`.
SPECULATORS_VARIANTS = (
    {"fc_norm": True, "norm_output": True},
    {"norm_before_fc": True, "norm_before_residual": True},
)
SPECFORGE_VARIANTS = ({"norm_output": True}, {"norm_output": False}, {"fc_norm": True, "norm_output": False})
EAGLE_REPO = "https://github.com/SafeAILab/EAGLE"


def ensure_venv(peers_dir: Path, name: str) -> Path:
    python = peers_dir / name / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(peers_dir / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS[name]], check=True)
        if name == "spec":
            # speculators pulls torchvision/torchaudio builds that do not match the CPU torch and break importing
            # transformers; its EAGLE-3 path uses neither.
            subprocess.run(
                [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=True
            )
        if name == "sf":
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "specforge==0.2.0"], check=True)
    return python


def ensure_eagle_source(peers_dir: Path) -> Path:
    source = peers_dir / "EAGLE"
    if not (source / "eagle" / "model" / "ea_model.py").exists():
        subprocess.run(["git", "clone", "--depth", "1", EAGLE_REPO, str(source)], check=True)
    return source


def add_slow_tokenizer_files(directory: Path) -> None:
    """EaModel loads the target's tokenizer with `use_fast=False` under transformers 4.53, which knows neither the
    class name transformers 5 saves nor a tokenizer.json-only folder: add SmolLM2's GPT-2 style vocab and merges."""
    tokenizer = json.loads((directory / "tokenizer.json").read_text())["model"]
    (directory / "vocab.json").write_text(json.dumps(tokenizer["vocab"]))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in tokenizer["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))


def run_peer(python: Path, script: str, *args: str | Path) -> None:
    # A fresh working directory: nothing may resolve because of where the command happens to run.
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run([str(python), str(HERE / script), *map(str, args)], check=True, cwd=cwd)


def compare(name: str, ours: torch.Tensor, theirs: torch.Tensor, how: str, **extra) -> dict:
    diff = (ours - theirs).abs().max().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"{name:<42} max |diff| {diff:.2e}  argmax agreement {agree:.3f}")
    return {"check": name, "how": how, "max_abs_diff": diff, "argmax_agreement": agree, **extra}


@torch.no_grad()
def score(head: Eagle3DraftModel, inputs: dict) -> list[torch.Tensor]:
    """The head's logits on the inputs (step 0), and those of the training-time-test step that feeds its own output
    back (step 1, positions whose ids all lie inside the inputs)."""
    step0 = head(inputs["input_ids"], target_hidden_states=inputs["target_hidden_states"]).logits
    # unroll_draft shifts the ids itself: give it the sequence one token earlier.
    ids = torch.cat([inputs["input_ids"][:, :1], inputs["input_ids"][:, :-1]], dim=1)
    mask = torch.ones_like(ids)
    steps = list(unroll_draft(head, inputs["target_hidden_states"], ids, mask, num_steps=2))
    return [step0, steps[1].logits[:, :-2]]


def variant_head(head: Eagle3DraftModel, target, **switches) -> Eagle3DraftModel:
    """The shipped head with EAGLE-3.1 switches turned on, its (new and old) norm weights drawn at random so that
    every switch changes the logits."""
    config = copy.deepcopy(head.config)
    for name, value in switches.items():
        setattr(config, name, value)
    variant = Eagle3DraftModel(config).eval()
    variant.load_state_dict(head.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in variant.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return variant.attach_target(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-dir", type=Path, default=Path("/work/peers"))
    parser.add_argument("--work-dir", type=Path, help="where exports are written (default: a temporary directory)")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--output", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    args.peers_dir.mkdir(parents=True, exist_ok=True)
    pythons = {name: ensure_venv(args.peers_dir, name) for name in PEER_REQUIREMENTS}
    eagle_source = ensure_eagle_source(args.peers_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hf-eagle3-interop-"))
    work.mkdir(parents=True, exist_ok=True)

    # The target as a plain HF folder, sharded: the official loader finds the embedding through the index file.
    # A model loaded from GGUF refuses save_pretrained, so its dequantised weights go into a plain copy first.
    target, tokenizer = hf_eagle3.load_target("smollm2", dtype=torch.float32)
    target_dir = work / "target"
    config = copy.deepcopy(target.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(target.state_dict())
    plain.save_pretrained(target_dir, max_shard_size="200MB")
    tokenizer.save_pretrained(target_dir)
    add_slow_tokenizer_files(target_dir)

    head_path = hf_eagle3.shipped_head_path("smollm2")
    head = Eagle3DraftModel.from_pretrained(head_path, dtype=torch.float32).attach_target(target)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad(), TargetFeatureCapture(target, head.config.target_layer_ids) as capture:
        target(ids)
        features = capture.pop()
    # Features of position t with the token t + 1: the alignment every implementation shares.
    inputs = {"target_hidden_states": features[:, :-1].contiguous(), "input_ids": ids[:, 1:].contiguous()}
    ours = score(head, inputs)
    inputs["d2t"] = head.d2t.clone()
    torch.save(inputs, work / "inputs.pt")

    results = []
    for format in ("eagle3", "speculators", "specforge"):
        cli_main(["convert", str(head_path), str(work / format), "--to", format, "--target", str(target_dir)])

    run_peer(pythons["eagle"], "peer_eagle.py", eagle_source, target_dir, work / "eagle3", work / "inputs.pt",
             work / "eagle.pt")  # fmt: skip
    config = json.loads((work / "eagle3" / "config.json").read_text())
    results.append(compare("official EAGLE EaModel <- eagle3 export", ours[0], torch.load(work / "eagle.pt")["logits"],
                           "EaModel.from_pretrained(base_model_path=target, ea_model_path=export), ea_layer forward",
                           config_has_target_hidden_size="target_hidden_size" in config))  # fmt: skip

    def speculators_check(name: str, export: Path, mine: list[torch.Tensor], how: str) -> None:
        run_peer(pythons["spec"], "peer_speculators.py", "load", export, work / "inputs.pt", work / "spec.pt")
        peer = torch.load(work / "spec.pt")
        verifier = json.loads((export / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"]
        extra = {"verifier_is_target_dir": verifier == str(target_dir), "embedding_loaded": peer["embedding_loaded"]}
        results.append(compare(f"{name}, step 0", mine[0], peer["logits"][0], how, **extra))
        results.append(compare(f"{name}, step 1", mine[1], peer["logits"][1][:, :-2], how + ", TTT step 1"))

    speculators_check("speculators 0.9 <- speculators export", work / "speculators", ours,
                      "SpeculatorModel.from_pretrained(export) from an empty working directory")  # fmt: skip

    def specforge_check(name: str, export: Path, mine: torch.Tensor) -> None:
        run_peer(pythons["sf"], "peer_specforge.py", "load", export, target_dir, work / "inputs.pt", work / "sf.pt")
        results.append(compare(name, mine, torch.load(work / "sf.pt")["logits"],
                               "SpecForge's draft loading (from_config + warm_start_draft_model + load_embedding), "
                               "step 0"))  # fmt: skip

    specforge_check("SpecForge 0.2 draft class <- specforge export", work / "specforge", ours[0])

    # EAGLE-3.1 heads exported by hf-eagle3, loaded by the peers whose layouts carry their switches.
    for switches in SPECULATORS_VARIANTS:
        variant = variant_head(head, target, target_name_or_path=str(target_dir), **switches)
        variant.save_pretrained(work / "variant-speculators", format="speculators")
        speculators_check(f"speculators 0.9 <- hf-eagle3 head {switches}", work / "variant-speculators",
                          score(variant, inputs), "save_pretrained(format='speculators'), SpeculatorModel")  # fmt: skip
    variant = variant_head(head, target, fc_norm=True)
    variant.save_pretrained(work / "variant-specforge", format="specforge")
    specforge_check("SpecForge 0.2 <- hf-eagle3 head {'fc_norm': True}", work / "variant-specforge",
                    score(variant, inputs)[0])  # fmt: skip

    # Heads the peers write with their own classes, loaded here.
    for switches in SPECULATORS_VARIANTS:
        written = work / "speculators-written"
        run_peer(pythons["spec"], "peer_speculators.py", "write", work / "speculators" / "config.json",
                 json.dumps(switches), work / "inputs.pt", work / "spec-written.pt", written)  # fmt: skip
        loaded = Eagle3DraftModel.from_pretrained(written, dtype=torch.float32).attach_target(target)
        peer = torch.load(work / "spec-written.pt")["logits"]
        mine = score(loaded, inputs)
        how = "speculators Eagle3DraftModel(config).save_pretrained, then Eagle3DraftModel.from_pretrained"
        results.append(compare(f"hf-eagle3 <- speculators head {switches}, step 0", mine[0], peer[0], how))
        results.append(compare(f"hf-eagle3 <- speculators head {switches}, step 1", mine[1], peer[1][:, :-2], how))
    for switches in SPECFORGE_VARIANTS:
        written = work / "specforge-written"
        run_peer(pythons["sf"], "peer_specforge.py", "write", work / "specforge" / "config.json", json.dumps(switches),
                 target_dir, work / "inputs.pt", work / "sf-written.pt", written)  # fmt: skip
        loaded = Eagle3DraftModel.from_pretrained(written, dtype=torch.float32).attach_target(target)
        results.append(compare(f"hf-eagle3 <- SpecForge head {switches}", score(loaded, inputs)[0],
                               torch.load(work / "sf-written.pt")["logits"],
                               "LlamaForCausalLMEagle3(config).save_pretrained, then Eagle3DraftModel.from_pretrained",
                               switches_read=loaded.config.variant_switches))  # fmt: skip

    passed = all(result["max_abs_diff"] <= args.tolerance for result in results)
    report = {
        "head": str(head_path.relative_to(Path(hf_eagle3.__file__).parent.parent)),
        "positions": int(inputs["input_ids"].shape[1]),
        "tolerance": args.tolerance,
        "passed": passed,
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'all within' if passed else 'NOT all within'} {args.tolerance:g}; wrote {os.path.relpath(args.output)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
