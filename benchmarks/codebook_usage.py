"""Codebook utilisation and semantic-ID uniqueness per level: RQ-VAE against CoBa RQ-VAE, with and
without the re-seeding of unused codes (issue 12's "CoBa raises codebook utilisation").

Our RQ-VAE re-seeds codes no item uses every `dead_code_reset_every` epochs, so with it every code
of every level ends up used and utilisation cannot separate the two tokenizers. Without it
(`dead_code_reset_every=0`, a plain RQ-VAE) the comparison the paper makes is visible. Tokenizer
only (no recommender training): the items' collaborative embeddings from the training split, the
RQ-VAE's fast or full setting, seed 0.

  python benchmarks/codebook_usage.py --datasets amazon-beauty,mbht-retail --setting fast
  python benchmarks/codebook_usage.py --datasets amazon-beauty --codebook-size 1024 --out .../codebook_usage_1024.md

--ablations: re-seeding off only, CoBa with each of its three parts removed in turn (co-occurrence
propagation, uniformity loss, load balancing), beside the plain RQ-VAE and the whole CoBa.
"""
import argparse
import dataclasses
import os
import subprocess
import time

import torch

from sparserec.data import default_split, load_dataset
from sparserec.tokenize import ItemTokenizer, RQVAEConfig, TokenizerConfig
from sparserec.tokenize.coba import CoBaConfig

# (label, method, CoBa settings) of --ablations
ABLATIONS = (("rqvae", "rqvae", CoBaConfig()), ("coba", "coba", CoBaConfig()),
             ("coba without propagation", "coba", CoBaConfig(steps=0)),
             ("coba without uniformity", "coba", CoBaConfig(uniformity=0.0)),
             ("coba without balancing", "coba", CoBaConfig(balance=0.0)))


def fit(data, split, method: str, reseed: bool, setting: str, codebook_size: int, coba: CoBaConfig = CoBaConfig()):
    rqvae = RQVAEConfig.fast(codebook_size=codebook_size) if setting == "fast" else RQVAEConfig(
        codebook_size=codebook_size)
    if not reseed:
        rqvae = dataclasses.replace(rqvae, dead_code_reset_every=0)
    config = TokenizerConfig(rqvae=rqvae, method=method, coba=coba)
    started = time.process_time()
    tokenizer = ItemTokenizer.fit(data, config, train_end=split.train_end, progress=False)
    return tokenizer.stats, time.process_time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="amazon-beauty,mbht-retail")
    parser.add_argument("--setting", choices=("fast", "full"), default="fast", help="the RQ-VAE budget")
    parser.add_argument("--codebook-size", type=int, default=256, help="codes per level")
    parser.add_argument("--ablations", action="store_true", help="CoBa without each of its parts (re-seeding off)")
    parser.add_argument("--out", default="benchmarks/results/codebook_usage.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"RQ-VAE setting: {args.setting}; codebooks 3 x {args.codebook_size}; seed 0; commit {commit}; torch {torch.__version__}",
             "", "| data | tokenizer | re-seed unused codes | utilisation L1 / L2 / L3 | unique L2 | unique L3 | "
             "max items per SID | CPU s |", "|---|---|---|---|---|---|---|---|"]
    for name in args.datasets.split(","):
        data = load_dataset(name)
        split = default_split(data)
        runs = [(label, method, coba, False) for label, method, coba in ABLATIONS] if args.ablations else [
            (method, method, CoBaConfig(), reseed) for reseed in (True, False) for method in ("rqvae", "coba")]
        for label, method, coba, reseed in runs:
            stats, seconds = fit(data, split, method, reseed, args.setting, args.codebook_size, coba)
            use = " / ".join(f"{stats[f'utilisation_level_{level}']:.3f}" for level in (1, 2, 3))
            lines.append(f"| {name} | {label} | {'yes' if reseed else 'no'} | {use} | "
                         f"{stats['unique_level_2']:.3f} | {stats['unique_level_3']:.3f} | "
                         f"{stats['max_items_per_sid']} | {seconds:.0f} |")
            print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
